"""The catalogue of methods: a new selector or peer is one entry, and validation, FLOPs, the pruned
forward and the chapters pick it up; labels and families come from the entries."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import timm

from heart_lib import catalogue
from heart_lib.catalogue import DropSite, FlopsSite, PeerSite, ReducerEntry
from heart_lib.experiments import claims
from heart_lib.experiments import pruning as chapter
from heart_lib.flops import count_flops, counted_flops
from heart_lib.pruning import PruningConfig, prune, token_plan

TINY = dict(img_size=32, patch_size=8, depth=4, num_classes=10)
PROBE = torch.linspace(-1, 1, 192)  # vit_tiny's width


def _probe_scores(site: DropSite) -> torch.Tensor:
    # a linear probe: one multiply-add per channel and token, which FlopCounterMode sees as a matmul
    return (site.x @ PROBE.to(site.x.dtype)[:, None]).squeeze(-1)


def _probe_flops(site: FlopsSite) -> int:
    return 2 * site.n_in * site.shape.dim


def _truncate(site: PeerSite):
    keep = site.prefix + site.target  # the first tokens stay, the rest vanish
    return site.x[:, :keep], site.index[:, :keep], site.size


@pytest.fixture()
def toys():
    catalogue.register_reducer(ReducerEntry(
        "toy_probe", "toy linear probe", "heuristic", "block_input", lambda n, k, fuse: k + 1 if fuse else k,
        scorer=_probe_scores, extra_flops=_probe_flops, min_layer=1, min_layer_reason="a toy rule"))
    catalogue.register_reducer(ReducerEntry("toy_truncate", "toy truncation", "peer", "after_attention",
                                            lambda n, k, fuse: k, reduce=_truncate))
    yield
    catalogue.unregister("toy_probe")
    catalogue.unregister("toy_truncate")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **TINY).eval()


def test_toy_selector_is_validated_counted_and_run(toys, vit):
    # validated: its own layer rule, and the config's generic rules
    with pytest.raises(ValueError, match="toy_probe.*layer 0.*a toy rule"):
        PruningConfig(layers=(0,), keep=(0.5,), selector="toy_probe")
    with pytest.raises(ValueError, match="variant applies"):
        PruningConfig(layers=(1,), keep=(0.5,), selector="toy_probe", variant="abs")
    config = PruningConfig.parse("tokens=0.5@1,3;selector=toy_probe")
    assert PruningConfig.parse(config.to_string()) == config
    # counted: its own FLOPs are in the analytic total, which matches FlopCounterMode
    base = count_flops(config.replace(selector="norm"), base=vit)
    plan = token_plan(config, 16, 4, 1)
    extra = 2 * 192 * ((16 + 1) + plan[1][1])  # tokens entering blocks 1 and 3
    assert count_flops(config, base=vit) == base + extra
    pruned = prune(vit, config, keep_index=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    counted = counted_flops(pruned, images=images)
    assert abs(count_flops(pruned) - counted) / counted < 0.01
    # run: the kept tokens are the probe's top-scored ones, the counts follow the plan
    pruned(images)
    assert pruned.record.counts[0] == plan
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    stream = vit.blocks[0](tokens)
    expected = (stream[:, 1:] @ PROBE[:, None]).squeeze(-1).topk(8, dim=1).indices + 1
    kept = pruned.record.kept_index[1][:, 1:]
    assert torch.equal(kept.sort(dim=1).values, expected.sort(dim=1).values)
    # the chapter accepts it as a token selector
    chapter.Params(token_selectors=["toy_probe"], joint_selectors=["toy_probe"], primary_selector="toy_probe").check()


def test_toy_peer_runs_its_own_reduction_not_tome(toys, vit):
    config = PruningConfig(layers=(1,), keep=(0.5,), selector="toy_truncate")
    assert token_plan(config, 16, 4, 1)[1] == (17, 9)  # reduced between attention and MLP
    pruned = prune(vit, config, keep_index=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = pruned(images)
    tome = prune(vit, config.replace(selector="tome"))(images)
    assert not torch.allclose(out, tome)
    counted = counted_flops(pruned, images=images)  # no extra work of its own: the analytic count is exact
    assert count_flops(pruned) < count_flops(vit) and abs(count_flops(pruned) - counted) / counted < 0.01
    with pytest.raises(ValueError, match="fuse applies to drop selectors"):
        config.replace(fuse=True)
    chapter.Params(peers=["toy_truncate"]).check()


def test_unknown_names_fail_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"selector = 'nrom': allowed values are \[.*'norm'"):
        PruningConfig(selector="nrom")
    with pytest.raises(ValueError, match="method = 'taylr': allowed values are .*taylor"):
        catalogue.score("taylr")
    with pytest.raises(ValueError, match="already in the catalogue"):
        catalogue.register_reducer(catalogue.reducer("norm"))


def test_labels_families_and_primaries():
    assert catalogue.label("heart |S|") == "HEART single probe (per layer) |S|"
    assert catalogue.label("tome") == "ToMe"
    assert catalogue.label("second_order") == catalogue.SCORES["second_order"].label
    with pytest.raises(ValueError, match="not in the catalogue"):
        catalogue.label("nope")
    # a family has at most one primary; HEART's is the paper's raw single-probe S
    families = {e.family for e in catalogue.SCORES.values()}
    for family in families:
        assert len(catalogue.scores(family=family, primary=True)) <= 1, family
    assert catalogue.scores(family="heart", primary=True) == ("heart",)
    # every C1 family declares exactly one primary, before any result is read
    assert {catalogue.primary(f) for f in catalogue.FAMILIES} >= {"heart", "taylor_signed", "norm", "random"}
    assert catalogue.score(catalogue.primary("first_order")).formula(torch.tensor([2.0]), None).item() == -2.0
    assert catalogue.score("taylor").needs == ("gradient",)
    assert catalogue.score("heart_exact").needs == ("gradient", "curvature")
    assert catalogue.score("cls_attention").needs == ("recording",)


def test_catalogue_is_a_leaf_module():
    # importable first and alone: nothing in heart_lib is needed to read the entries
    code = "import sys, heart_lib.catalogue as c; print(sorted(m for m in sys.modules if m.startswith('heart_lib.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['heart_lib._compat', 'heart_lib.catalogue']"
