"""A NaN pixel or an inf weight is named, never turned silently into NaN scores or logits (issue 16)."""

import pytest
import torch

from heart_lib import sensitivity
from heart_lib.checks import NonFiniteError
from heart_lib.pruning import prune


@pytest.fixture
def nan_images():
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images[2, 1, 5, 7] = float("nan")
    return images


@pytest.mark.parametrize("method", ["cls_attention", "norm"])
def test_heuristic_scores_name_the_image_with_a_nan_pixel(tiny_vit, nan_images, method, one_thread):
    with pytest.raises(NonFiniteError, match=rf"{method} scores are NaN/inf for 1 image\(s\) at batch indices 2;"):
        sensitivity.score_components(tiny_vit.eval(), nan_images, layers=[1], heads=True, method=method)


def test_heuristic_scores_of_finite_inputs_pass(tiny_vit, nan_images, one_thread):
    scores = sensitivity.score_components(tiny_vit.eval(), nan_images[:2], layers=[1], method="norm")
    assert torch.isfinite(scores.tokens[1]).all()


@pytest.mark.parametrize("selector", ["cls_attention", "norm", "random", "evit", "tome"])
def test_pruned_forward_names_the_image_with_a_nan_pixel(tiny_vit, nan_images, selector, one_thread):
    pruned = prune(tiny_vit.eval(), f"tokens=0.5@1;selector={selector}").eval()
    with pytest.raises(NonFiniteError, match=rf"selector {selector}\).*batch indices 2;"):
        pruned(nan_images)
    assert torch.isfinite(pruned(nan_images[:2])).all()


def test_inf_weight_is_named_for_every_image(tiny_vit, one_thread):
    with torch.no_grad():
        tiny_vit.blocks[0].mlp.fc1.weight[0, 0] = float("inf")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(NonFiniteError, match=r"3 image\(s\) at batch indices 0, 1, 2;.*weights"):
        prune(tiny_vit.eval(), "tokens=0.5@1;selector=norm").eval()(images)
    with pytest.raises(NonFiniteError, match="norm scores"):
        sensitivity.score_components(tiny_vit.eval(), images, layers=[1], method="norm")
