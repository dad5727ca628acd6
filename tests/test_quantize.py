"""``base.quantize``: the frozen base stored in fp8, int8 or nf4 (bitsandbytes, which runs on the
CPU) trains what it trained before, within the scheme's error, and the planner counts its bytes."""

from __future__ import annotations

import pytest
import torch

from controlnet_recipe.adapters import adapter
from controlnet_recipe.core.config import AdapterCfg, load_config
from controlnet_recipe.models import tiny
from controlnet_recipe.models.families import family
from controlnet_recipe.models.families.measured import frozen_linears, quantized_bytes
from controlnet_recipe.objectives.diffusion import Objective
from controlnet_recipe.planning.plan import plan_tier
from controlnet_recipe.training.quantize import quantize_frozen

from .conftest import ROOT


def _control_lora_step(scheme: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A Control-LoRA's prediction on the tiny Flux (its base quantised by ``scheme``), and its
    LoRA's gradients."""
    from controlnet_recipe.models.families.family import POOLED, TEXT

    torch.manual_seed(0)
    fam, kind = family("flux"), adapter("control_lora")
    t = tiny.build_flux_transformer().eval().requires_grad_(False)
    a = AdapterCfg(**{**dict.fromkeys(AdapterCfg.model_fields), "kind": "control_lora", "rank": 4})
    module = kind.make(fam, type("B", (), {"denoiser": t})(), None, a)
    with torch.no_grad():  # the LoRA's B away from zero, so that the condition matters
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    quantize_frozen(t, scheme, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    noised = fam.noise(tiny.build_flow_scheduler(dynamic_shifting=True), torch.randn(2, 4, 8, 8, generator=g), g, Objective())
    text = {TEXT: torch.randn(2, 8, tiny.T5_DIM, generator=g), POOLED: torch.randn(2, 64, generator=g)}
    pred = kind.residuals(fam, module, noised, text, {}, torch.randn(2, 4, 8, 8, generator=g), "cpu")
    pred.square().mean().backward()
    return pred.detach(), {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("scheme", ["fp8", "int8", "nf4"])
def test_a_quantised_base_trains_the_lora_within_the_schemes_error(scheme: str):
    want, _ = _control_lora_step("none")
    got, grads = _control_lora_step(scheme)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < {"fp8": 0.1, "int8": 0.05, "nf4": 0.25}[scheme], error  # changed, but within the scheme's error
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())  # every LoRA factor learns


def test_int8_and_nf4_quantise_every_frozen_linear_but_a_loras_factors():
    t = tiny.build_flux_transformer().requires_grad_(False)
    n = len(frozen_linears(t))
    assert n == sum(1 for m in t.modules() if type(m) is torch.nn.Linear)
    module = adapter("control_lora").make(family("flux"), type("B", (), {"denoiser": t})(), None, AdapterCfg(
        **{**dict.fromkeys(AdapterCfg.model_fields), "kind": "control_lora"}))  # fmt: skip
    names = frozen_linears(t)
    assert names and not any("lora_" in name for name in names)  # the factors train
    assert quantize_frozen(t, "nf4", torch.float32, "cpu") == len(names) and not frozen_linears(t)
    import bitsandbytes as bnb

    assert isinstance(t.x_embedder.base_layer, bnb.nn.Linear4bit) and t.x_embedder.base_layer.weight.dtype == torch.uint8
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_the_planner_counts_nf4_as_half_a_byte_and_fits_flux_control_lora_on_16gb():
    assert quantized_bytes("nf4", (3072, 3072)) == 3072 * 3072 // 2 + 147456 + 4 * 576
    assert quantized_bytes("int8", (10, 20)) == 200 + 40
    cfg = load_config(ROOT / "params.yaml", {"recipe": "flux"})
    r = cfg.recipe.model_copy(
        update={
            "adapter": cfg.recipe.adapter.model_copy(update={"kind": "control_lora"}),
            "base": cfg.recipe.base.model_copy(update={"quantize": "nf4"}),
        }
    )
    plan = plan_tier(r, "flux-16gb", cfg.tiers["flux-16gb"])  # without nf4 it does not fit (docs/adapters.md)
    assert plan.fits is True and plan.adapter == "control_lora"
    assert 5.0 < plan.terms["weights_transformer_nf4"] < 6.5  # FLUX.1-dev's 11.9B parameters, about half a byte each
