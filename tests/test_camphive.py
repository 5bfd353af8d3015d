"""CAMP-HiVe's maths: power iteration against a dense Hessian, the split, the merge rule, masks, errors."""

import pytest
import torch
from torch import nn

from heart_lib import camphive, resnet_cifar


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _batches(seed: int = 0, count: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(count)]


def test_power_iteration_finds_the_top_eigenvector_of_the_dense_hessian(one_thread):
    model, batches = _tiny().double(), [(x.double(), y) for x, y in _batches()]
    names = camphive.prunable_names(model)
    fn = camphive.loss_of_weights(model, names, batches)
    primals = tuple(dict(model.named_parameters())[n].detach() for n in names)
    sizes = [p.numel() for p in primals]

    def flat_fn(flat):
        return fn(*(t.view(p.shape) for t, p in zip(flat.split(sizes), primals)))

    hessian = torch.autograd.functional.hessian(flat_fn, torch.cat([p.flatten() for p in primals]))
    values, vectors = torch.linalg.eigh(hessian)
    top = values.abs().argmax()
    found = camphive.dominant_eigenpair(model, names, batches, iters=500, tol=1e-12)
    v = torch.cat([found.eigenvector[n].flatten() for n in names])
    assert found.eigenvalue == pytest.approx(float(values[top]), rel=1e-6)
    assert abs(float(v @ vectors[:, top])) == pytest.approx(1.0, abs=1e-5)


def test_split_prunes_exactly_the_lowest_scores_per_tensor_and_globally():
    score = {"a": torch.tensor([4.0, 1.0, 3.0, 2.0]), "b": torch.tensor([[10.0, 0.5], [7.0, 8.0]])}
    per = camphive.keep_masks(score, 0.5, "per_tensor")
    assert per["a"].tolist() == [True, False, True, False]
    assert per["b"].tolist() == [[True, False], [False, True]]
    glob = camphive.keep_masks(score, 0.5, "global")  # the four lowest of all eight: 0.5, 1, 2, 3
    assert glob["a"].tolist() == [True, False, False, False]
    assert glob["b"].tolist() == [[True, False], [True, True]]


def test_cyclic_partners_and_merge_rule_on_a_hand_made_tensor():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    score = torch.tensor([0.1, 0.9, 0.2, 0.5, 0.3, 0.7])
    keep = camphive.keep_masks({"w": score}, 0.5)["w"]  # prunes indices 0, 2, 4
    pruned, partners = camphive.cyclic_partners(keep, score)
    # significant by increasing score: 3 (0.5), 5 (0.7), 1 (0.9); pruned index i -> significant[i mod 3]
    assert pruned.tolist() == [0, 2, 4] and partners.tolist() == [3, 1, 5]
    merged = camphive.merge_into_partners(w, keep, score, 0.5)
    assert merged.tolist() == [0.0, 2.0 + 1.5, 0.0, 4.0 + 0.5, 0.0, 6.0 + 2.5]
    # partners repeat when more than half are pruned: the merged mass is still half of the pruned mass
    keep70 = camphive.keep_masks({"w": score}, 4 / 6)["w"]
    merged70 = camphive.merge_into_partners(w, keep70, score, 0.5)
    assert float(merged70.sum()) == pytest.approx(float(w[keep70].sum() + 0.5 * w[~keep70].sum()))
    assert (merged70[~keep70] == 0).all()


def test_scores_follow_their_formulas():
    w = {"w": torch.tensor([-2.0, 1.0, 0.5])}
    v = {"w": torch.tensor([0.1, -0.8, 0.6])}
    d = {"w": torch.tensor([1.0, 2.0, 4.0])}
    assert camphive.scores("eigvec", w, eigenvector=v)["w"].tolist() == pytest.approx([0.1, 0.8, 0.6])
    assert camphive.scores("magnitude", w)["w"].tolist() == [2.0, 1.0, 0.5]
    assert camphive.scores("obd", w, diagonal=d)["w"].tolist() == pytest.approx([2.0, 1.0, 0.5])
    assert camphive.scores("eigvec_weight", w, eigenvector=v)["w"].tolist() == pytest.approx([0.2, 0.8, 0.3])


def test_masks_stay_zero_through_fine_tuning_steps_and_regrow_without_enforcement(one_thread):
    model = resnet_cifar.create("resnet8", seed=0)
    names = camphive.prunable_names(model)
    score = camphive.scores("magnitude", {n: p for n, p in model.named_parameters() if n in names})
    masks = camphive.keep_masks(score, 0.5)
    camphive.prune(model, masks, "merge", score)
    assert camphive.sparsity(model, names) == pytest.approx(0.5, abs=1e-3)
    g = torch.Generator().manual_seed(0)
    data = resnet_cifar.data.TensorImages(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g),
                                          torch.randint(0, 10, (16,), generator=g))
    enforced = resnet_cifar.create("resnet8", seed=0)
    enforced.load_state_dict(model.state_dict())
    for net, after in ((enforced, camphive.mask_enforcer(enforced, masks)), (model, None)):
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        resnet_cifar.train_epoch(net, data, opt, 8, torch.Generator().manual_seed(1), after_step=after)
    params = dict(enforced.named_parameters())
    assert all((params[n][~masks[n]] == 0).all() for n in names)
    assert camphive.sparsity(model, names) < 0.1  # the reference behaviour: pruned weights grow back


def test_sparse_macs_scale_with_the_nonzero_fraction():
    model = _tiny()
    dense, sparse = camphive.dense_and_sparse_macs(model, torch.randn(2, 4))
    assert dense == sparse == 4 * 5 + 5 * 3
    with torch.no_grad():
        model[0].weight[:, :2] = 0
    assert camphive.dense_and_sparse_macs(model, torch.randn(2, 4)) == (35, 35 - 10)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_the_open_interval_is_rejected(value):
    with pytest.raises(ValueError, match=r"sparsity = .*must be in \(0, 1\)"):
        camphive.keep_masks({"w": torch.ones(4)}, value)


def test_unknown_tensor_names_and_models_without_prunable_weights_are_rejected():
    with pytest.raises(ValueError, match=r"unknown parameter name\(s\) \['nope'\]"):
        camphive.prunable_names(_tiny(), ["0.weight", "nope"])
    with pytest.raises(ValueError, match="no prunable weights"):
        camphive.prunable_names(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="tensors = 'heads'"):
        camphive.prunable_names(_tiny(), "heads")
    with pytest.raises(ValueError, match="score = 'taylor'"):
        camphive.scores("taylor", {})


def test_tensor_sets_of_a_vit_and_a_cifar_resnet(tiny_vit):
    blocks = camphive.prunable_names(tiny_vit, "blocks_linear")
    depth = len(tiny_vit.blocks)
    assert len(blocks) == 4 * depth  # qkv, proj, fc1, fc2 per block; no patch embedding, no head
    assert all(n.startswith("blocks.") and n.endswith(".weight") for n in blocks)
    everything = camphive.prunable_names(tiny_vit, "all")
    assert set(blocks) < set(camphive.prunable_names(tiny_vit, "conv_linear")) < set(everything)
    resnet = camphive.prunable_names(resnet_cifar.create("resnet20"))
    assert len(resnet) == 19 + 1  # 19 convolutions and the classifier (option-A shortcuts have no weights)
