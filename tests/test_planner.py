"""The GPU-memory planner: its terms add up, the switches lower the right terms, its prediction
matches what a real step allocates (measured by PyTorch's profiler, not by the planner's tracker),
`gpu: auto` picks per the planner, and `plan` speaks in one line when it cannot plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from controlnet_recipe.cli import main as cli_main
from controlnet_recipe.config import ConfigError, Tier, load_config
from controlnet_recipe.planning import fit, plan, tracker
from controlnet_recipe.planning.measure import StepSpec, measure

TINY = dict(arch="tiny", resolution=64, micro_batch=4, mixed_precision="no", adam="fused")


def test_terms_add_up_to_the_peaks():
    p = plan.plan_step(StepSpec(**TINY, gradient_checkpointing=True), use_8bit_adam=True)
    assert sum(p.terms.values()) == pytest.approx(p.peak_gib, rel=1e-9)
    assert sum(p.validation_terms.values()) == pytest.approx(p.validation_peak_gib, rel=1e-9)
    assert p.terms["cuda_context"] == plan.CUDA_CONTEXT_GIB
    allocated = p.peak_gib - p.terms["allocator_overhead"] - p.terms["cuda_context"]
    assert p.terms["allocator_overhead"] == pytest.approx(allocated * plan.ALLOCATOR_OVERHEAD)
    assert {"weights_controlnet_fp32", "weights_unet_fp32", "gradients", "optimizer_8bit", "activations"} <= set(p.terms)


def test_checkpointing_lowers_activations_and_nothing_else():
    spec = dict(TINY, resolution=128, micro_batch=8, set_grads_to_none=False)
    plain = plan.plan_step(StepSpec(**spec, gradient_checkpointing=False))
    ckpt = plan.plan_step(StepSpec(**spec, gradient_checkpointing=True))
    assert ckpt.terms["activations"] < 0.7 * plain.terms["activations"]
    for k in ("weights_controlnet_fp32", "weights_unet_fp32", "gradients", "optimizer"):
        assert ckpt.terms[k] == pytest.approx(plain.terms[k]), k


def test_8bit_adam_lowers_the_optimizer_state_fourfold():
    spec = dict(TINY, set_grads_to_none=False)
    adamw = plan.plan_step(StepSpec(**spec))
    eight = plan.plan_step(StepSpec(**{**spec, "adam": "none"}), use_8bit_adam=True)
    assert "optimizer" not in eight.terms and "optimizer_8bit" in adamw.terms or "optimizer" in adamw.terms
    # uint8 moments plus one fp32 absmax per 256 values, and fp32 moments for tensors under 4096 values
    assert eight.terms["optimizer_8bit"] < 0.5 * adamw.terms["optimizer"]
    assert eight.terms["weights_controlnet_fp32"] == pytest.approx(adamw.terms["weights_controlnet_fp32"])


def test_bnb_state_formula():
    # a 4096-value tensor: 2 x 4096 uint8 + 2 x 16 fp32 absmax; a 100-value one: 2 x 100 fp32
    assert plan.bnb_state_bytes([(64, 64), (100,)]) == 2 * 4096 + 2 * 4 * 16 + 2 * 4 * 100


def _real_step_peak(spec: StepSpec) -> int:
    """The same step run for real on the CPU, its peak from PyTorch's profiler (the allocator's own
    events, not the planner's dispatch-mode tracker): the ControlNet and loss as the train stage
    makes them, fused AdamW, two optimizer steps."""
    from controlnet_recipe.diffusion import Objective
    from controlnet_recipe.models import tiny
    from controlnet_recipe.training.batches import step_generator
    from controlnet_recipe.training.step import LossInputs, controlnet_from_unet, controlnet_loss

    torch.manual_seed(0)
    unet = tiny.build_unet(spec.resolution).requires_grad_(False).eval()
    controlnet = controlnet_from_unet(unet, tiny.build_vae(spec.resolution).config).train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, fused=True)
    b, lat = spec.micro_batch, spec.resolution // 4
    batch = {
        "latent_mean": torch.randn(b, 4, lat, lat),
        "latent_std": torch.full((b, 4, lat, lat), 0.01),
        "text_embedding": torch.randn(b, tiny.MAX_TOKENS, tiny.TEXT_DIM),
        "conditioning": torch.rand(b, 3, spec.resolution, spec.resolution),
    }
    empty = {"text_embedding": torch.zeros(1, tiny.MAX_TOKENS, tiny.TEXT_DIM)}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for step in range(2):
            inputs = LossInputs(
                controlnet=controlnet,
                unet=unet,
                scheduler=tiny.build_scheduler(),
                empty_prompt=empty,
                scaling_factor=0.18215,
                p_empty=0.0,
                device=torch.device("cpu"),
                dtype=torch.float32,
                objective=Objective(),
            )
            loss = controlnet_loss(inputs, batch, step_generator(0, step, 0, 0))
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
    # live bytes over time: each operator's own allocations less its frees, and the frees recorded
    # outside any operator ([memory]); what existed before (weights, the batch) added
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    before = sum(t.numel() * t.element_size() for m in (unet, controlnet) for t in (*m.parameters(), *m.buffers()))
    before += sum(t.numel() * t.element_size() for t in batch.values())
    return before + peak


def test_prediction_within_ten_percent_of_a_real_step(monkeypatch):
    monkeypatch.setattr(tracker, "ROUND", 1)  # the CPU allocator does not round as CUDA's does
    measure.cache_clear()
    spec = StepSpec(arch="tiny", resolution=128, micro_batch=8, mixed_precision="no", adam="fused")
    m = measure(spec)
    real = _real_step_peak(spec)
    ratio = m.step_peak / real
    measure.cache_clear()
    print(f"predicted {m.step_peak / 2**20:.1f} MiB, real {real / 2**20:.1f} MiB, ratio {ratio:.3f}")
    assert 0.9 <= ratio <= 1.1, f"predicted {m.step_peak / 2**20:.1f} MiB, real {real / 2**20:.1f} MiB"


def test_auto_picks_per_the_planner():
    recipe = load_config("params.yaml", {"recipe": "faces"}).recipe.model_copy(deep=True)
    recipe = recipe.model_copy(update={"base": recipe.base.model_copy(update={"pretrained_model": None})})
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"resolution": 64})})

    def need(tier: Tier) -> float:
        p = plan.plan_step(plan.step_spec(recipe, tier, "tiny"), use_8bit_adam=tier.use_8bit_adam)
        return max(p.peak_gib, p.validation_peak_gib)

    big, why = fit.fit_tier(recipe, 80 * 1024**3, bf16=True, arch="tiny")[0], fit.fit_tier(recipe, 80 * 1024**3, True, "tiny")[2]
    assert (big.batch_size, big.gradient_checkpointing, big.use_8bit_adam, big.mixed_precision) == (4, False, False, "bf16")
    assert "micro-batch 4" in why and "no memory-saving switch" in why
    # a card just too small for micro-batch 4 without switches: the planner's next choice
    tight = (need(big) - 0.002) / (1 - fit.MARGIN) * 1024**3
    chosen, p, _ = fit.fit_tier(recipe, int(tight), bf16=False, arch="tiny")
    assert chosen.mixed_precision == "fp16"
    assert max(p.peak_gib, p.validation_peak_gib) <= tight / 1024**3 * (1 - fit.MARGIN)
    assert (chosen.batch_size, chosen.gradient_checkpointing) != (4, False)
    with pytest.raises(ConfigError, match="nothing fits"):
        fit.fit_tier(recipe, 100 * 1024**2, bf16=True, arch="tiny")


def test_train_stage_auto_uses_the_planner_on_a_gpu(monkeypatch, capsys):
    from controlnet_recipe.models.base_model import BaseRef
    from controlnet_recipe.stages import train

    cfg = load_config("params.yaml", {"recipe": "faces", "gpu": "auto"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fit, "detect_and_fit", lambda recipe, arch: (cfg.tiers["24gb"], f"faked for {arch}"))
    name, tier = train.tier_for(cfg, BaseRef("stabilityai/stable-diffusion-2-1-base"))
    assert (name, tier) == ("auto", cfg.tiers["24gb"])
    assert "gpu: auto: faked for sd21-base" in capsys.readouterr().out


def test_plan_cli_prints_every_tier_and_json(capsys):
    assert cli_main(["plan", "--recipe", "demo"]) == 0
    out = capsys.readouterr().out
    cfg = load_config("params.yaml")
    for name in cfg.tiers:
        assert f"\n{name} " in out
    assert cli_main(["plan", "--recipe", "demo", "--gpu", "24gb", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["tier"] for r in rows] == ["24gb"]
    assert {"tier", "micro_batch", "peak_gib", "validation_peak_gib", "terms", "fits"} <= set(rows[0])


def test_plan_refuses_an_unknown_base_in_one_line(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    text = Path("params.yaml").read_text().replace("pretrained_model: null", "pretrained_model: someone/unknown-model", 1)
    params.write_text(text)
    assert cli_main(["plan", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "someone/unknown-model" in err and "stabilityai/stable-diffusion-2-1-base" in err and "FLUX.1-dev" in err
