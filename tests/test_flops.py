"""FLOPs per training step, counted on fake tensors, and MFU against a card's peak."""

from __future__ import annotations

import pytest
import torch

from controlnet_recipe.core.config import load_config
from controlnet_recipe.planning.flops import card_of, count_flops, mfu, peak_tflops, step_flops
from controlnet_recipe.planning.plan import plan_tier, step_spec


def test_a_small_model_is_counted_as_by_hand():
    """Two linears and a convolution, 2 FLOPs per multiply-add, forward and backward."""
    torch.manual_seed(0)
    b, i, h, o, c, k, side = 4, 8, 16, 3, 5, 3, 6
    lin1, lin2 = torch.nn.Linear(i, h), torch.nn.Linear(h, o)
    conv = torch.nn.Conv2d(2, c, k, padding=1)
    x, img = torch.randn(b, i), torch.randn(b, 2, side, side)

    def step() -> torch.Tensor:
        return lin2(torch.relu(lin1(x))).sum() + conv(img).sum()

    forward = 2 * b * i * h + 2 * b * h * o + 2 * b * c * side * side * 2 * k * k
    # backward: each weight's gradient (as much as its forward), and the input gradient of every
    # layer whose input needs one (lin2's; lin1's and the convolution's inputs are data)
    backward = 2 * b * i * h + 2 * (2 * b * h * o) + 2 * b * c * side * side * 2 * k * k
    assert count_flops(step) == forward + backward


@pytest.mark.slow  # three tiers' plans: about 20 s
def test_plan_gives_flops_per_sample_per_tier():
    cfg = load_config()
    rows = [plan_tier(cfg.recipe, name, cfg.tiers[name], flops=True).as_dict() for name in ("cpu", "16gb", "80gb")]
    assert rows
    for row in rows:
        assert row["flops_per_sample"]["model"] > 0
        assert row["flops_per_sample"]["hardware"] >= row["flops_per_sample"]["model"]
    model = {row["flops_per_sample"]["model"] for row in rows}
    assert len(model) == 1  # the model's FLOPs do not depend on the tier's memory switches


def test_checkpointing_adds_its_recomputed_forward():
    cfg = load_config()
    spec = step_spec(cfg.recipe, cfg.tiers["16gb"])
    assert spec.gradient_checkpointing
    f = step_flops(spec)
    assert f["model"] < f["hardware"] < 2 * f["model"]


@pytest.mark.parametrize(
    ("name", "card", "bf16"),
    [("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5), ("NVIDIA H200", "H200", 989.5), ("NVIDIA A100-SXM4-80GB", "A100", 312.0)],
)
def test_card_peaks(name: str, card: str, bf16: float):
    assert card_of(name) == card and peak_tflops(name, "bf16") == bf16
    assert mfu(52.6, 2e12, name, "bf16") == pytest.approx(52.6 * 2e12 / (bf16 * 1e12))


def test_an_unknown_card_has_no_mfu():
    assert card_of("Some GPU") is None and mfu(1.0, 1.0, "Some GPU", "bf16") is None
