"""The GPU-memory planner: its terms add up, the switches lower the right terms, its prediction
matches what a real step allocates (measured by PyTorch's profiler, not by the planner's tracker),
`gpu: auto` picks per the planner, and `plan` speaks in one line when it cannot plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from controlnet_recipe.cli import main as cli_main
from controlnet_recipe.core.config import Config, ConfigError, Tier, load_config
from controlnet_recipe.planning import cli as plan_cli
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
    from types import SimpleNamespace

    from controlnet_recipe.adapters import adapter
    from controlnet_recipe.core.config import AdapterCfg
    from controlnet_recipe.models import tiny
    from controlnet_recipe.models.families import family
    from controlnet_recipe.objectives.diffusion import Objective
    from controlnet_recipe.training.batches import step_generator
    from controlnet_recipe.training.step import LossInputs, controlnet_from_unet, controlnet_loss

    torch.manual_seed(0)
    unet = tiny.build_unet(spec.resolution).requires_grad_(False).eval()
    kind = adapter(spec.adapter)
    if spec.adapter == "controlnet":
        controlnet = controlnet_from_unet(unet, tiny.build_vae(spec.resolution).config).train()
    else:  # the kind's module as the trainer makes it
        base = SimpleNamespace(denoiser=unet, vae=tiny.build_vae(spec.resolution))
        t = SimpleNamespace(hint_init="random", controlnet_layers=None, controlnet_single_layers=None)
        a = AdapterCfg(**{**dict.fromkeys(AdapterCfg.model_fields), "kind": spec.adapter})
        controlnet = kind.make(family("sd"), base, t, a).train()
    opt = torch.optim.AdamW([p for p in controlnet.parameters() if p.requires_grad], lr=1e-5, fused=True)
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
                denoiser=unet,
                scheduler=tiny.build_scheduler(),
                empty_prompt=empty,
                scaling_factor=0.18215,
                p_empty=0.0,
                device=torch.device("cpu"),
                dtype=torch.float32,
                objective=Objective(),
                adapter=kind,
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


@pytest.mark.parametrize("kind", ["controlnet", "controlnet_lora", "t2i_adapter"])
def test_prediction_within_ten_percent_of_a_real_step(monkeypatch, kind: str):
    """The planner's step for each kind of control (its own module, ``residuals`` and ``predict``)
    against the trainer's step run for real."""
    monkeypatch.setattr(tracker, "ROUND", 1)  # the CPU allocator does not round as CUDA's does
    measure.cache_clear()
    spec = StepSpec(arch="tiny", resolution=128, micro_batch=8, mixed_precision="no", adam="fused", adapter=kind)
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
    monkeypatch.setattr(fit, "detect_and_fit", lambda recipe, arch, tiers: (cfg.tiers["24gb"], f"faked for {arch}"))
    name, tier = train.tier_for(cfg, BaseRef("stabilityai/stable-diffusion-2-1-base"))
    assert (name, tier) == ("auto", cfg.tiers["24gb"])
    assert "gpu: auto: faked for sd21-base" in capsys.readouterr().out


def test_plan_cli_prints_every_tier_and_json(capsys):
    assert cli_main(["plan", "--recipe", "demo"]) == 0
    out = capsys.readouterr().out
    cfg = load_config("params.yaml")
    for name, tier in cfg.tiers.items():  # every tier but the transformer families' (sized for SD3 and Flux)
        assert (f"\n{name} " in out) == (tier.family not in ("sd3", "flux")), name
    assert cli_main(["plan", "--recipe", "demo", "--gpu", "24gb", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["tier"] for r in rows] == ["24gb"]
    keys = {"tier", "adapter", "trainable_params", "micro_batch", "peak_gib", "validation_peak_gib", "terms", "fits"}
    assert keys | {"flops_per_sample"} <= set(rows[0]) and rows[0]["flops_per_sample"]["model"] > 0
    assert cli_main(["plan", "--recipe", "demo", "--gpu", "24gb", "--adapter", "t2i_adapter", "--json"]) == 0
    light = json.loads(capsys.readouterr().out)
    assert light["adapter"] == "t2i_adapter" and light["trainable_params"] < rows[0]["trainable_params"] / 2
    assert light["peak_gib"] < rows[0]["peak_gib"]


def test_plan_refuses_an_unknown_base_in_one_line(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    text = Path("params.yaml").read_text().replace("pretrained_model: null", "pretrained_model: someone/unknown-model", 1)
    params.write_text(text)
    assert cli_main(["plan", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "someone/unknown-model" in err and "stabilityai/stable-diffusion-2-1-base" in err and "FLUX.1-dev" in err


# The transformer families, planned from a recipe: the faces block with its base swapped (the flux
# and sd3 blocks come later). Each plan measures the full-size model on fake tensors (~15 s).
FLUX_DEV = "black-forest-labs/FLUX.1-dev"
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"


def _transformer_recipe(family: str, model: str | None, resolution: int = 512):
    recipe = load_config("params.yaml", {"recipe": "faces"}).recipe
    return recipe.model_copy(
        update={
            "base": recipe.base.model_copy(update={"pretrained_model": model, "family": family}),
            "data": recipe.data.model_copy(update={"resolution": resolution}),
        }
    )


def _flux_24gb_plans() -> tuple[plan.TierPlan, plan.TierPlan]:
    """flux-24gb at 512 px as params.yaml has it, and the same tier with the transformer in bf16."""
    tier = load_config("params.yaml").tiers["flux-24gb"]
    recipe = _transformer_recipe("flux", FLUX_DEV)
    return plan.plan_tier(recipe, "flux-24gb", tier), plan.plan_tier(
        recipe, "flux-24gb", tier.model_copy(update={"frozen_fp8": False})
    )


def test_flux_24gb_tier_fits_a_24gb_card_only_with_the_transformer_in_fp8():
    tier = load_config("params.yaml").tiers["flux-24gb"]
    assert tier.frozen_fp8 and tier.batch_size == 1
    recipe = _transformer_recipe("flux", None)  # the family alone names no model: refused in one line
    with pytest.raises(ConfigError, match="tiny demo base as sd"):
        plan.step_spec(recipe, tier)
    recipe = _transformer_recipe("flux", FLUX_DEV)
    spec = plan.step_spec(recipe, tier)
    # the train section's defaults: 4 double-stream + 0 single-stream blocks; micro-batch 1
    assert (spec.arch, spec.controlnet_layers, spec.micro_batch, spec.resolution) == ("flux1-dev", (4, 0), 1, 512)
    assert spec.frozen_fp8 and spec.gradient_checkpointing and spec.deepspeed
    fp8, bf16 = _flux_24gb_plans()
    assert fp8.budget_gib == pytest.approx(24 * plan.USABLE_FRACTION)
    assert fp8.peak_gib <= fp8.budget_gib, fp8.terms
    assert bf16.peak_gib > bf16.budget_gib, bf16.terms
    # checkpointed, the backward holds the upcast copies of one block at a time
    assert 0 < fp8.terms["frozen_fp8_upcast"] < 1.0
    # validation encodes its prompts on the CPU (FlowFamily.validation_inputs): no text encoder on
    # the GPU, only the VAE besides the training state; it fits the card too
    assert not spec.validation_text_encoders
    assert not [k for k in fp8.validation_terms if k.startswith("weights_text_encoder")], fp8.validation_terms
    assert fp8.validation_terms["weights_vae_bf16"] > 0
    assert fp8.validation_peak_gib <= fp8.budget_gib, fp8.validation_terms
    # SD's and SDXL's pipelines encode on the GPU
    sd = load_config("params.yaml", {"recipe": "faces"}).recipe
    assert plan.step_spec(sd, load_config("params.yaml").tiers["24gb"]).validation_text_encoders


def test_frozen_fp8_stores_the_cast_layers_in_one_byte():
    fp8, bf16 = _flux_24gb_plans()
    assert "weights_transformer_fp8" not in bf16.terms
    plain = bf16.terms["weights_transformer_bf16"]
    # the layers layerwise casting stores in fp8 take half their bf16 bytes; the ones it skips
    # (names matching "norm": the blocks' AdaLayerNorm modulation linears, a quarter of Flux) stay bf16
    cast_in_bf16 = plain - fp8.terms["weights_transformer_bf16"]
    assert fp8.terms["weights_transformer_fp8"] == pytest.approx(cast_in_bf16 / 2, rel=1e-3)
    frozen = fp8.terms["weights_transformer_fp8"] + fp8.terms["weights_transformer_bf16"]
    assert 0.5 * plain < frozen < 0.7 * plain
    for k in ("weights_controlnet_bf16", "deepspeed_buckets"):
        assert fp8.terms[k] == pytest.approx(bf16.terms[k]), k


def test_frozen_fp8_without_checkpointing_keeps_every_upcast_copy():
    """A layer whose input needs a gradient saves its compute-dtype weight for the backward (what
    diffusers' hooks do on real tensors): without checkpointing the copies outlive the forward."""
    spec = dict(arch="tiny", resolution=64, micro_batch=2, mixed_precision="bf16", adam="fused")
    plain = plan.plan_step(StepSpec(**spec))
    fp8 = plan.plan_step(StepSpec(**spec, frozen_fp8=True))
    ckpt = plan.plan_step(StepSpec(**spec, frozen_fp8=True, gradient_checkpointing=True))
    assert fp8.terms["weights_unet_fp8"] < 0.6 * plain.terms["weights_unet_bf16"]
    assert fp8.terms["frozen_fp8_upcast"] > 0.5 * fp8.terms["weights_unet_fp8"] * 2
    assert ckpt.terms.get("frozen_fp8_upcast", 0) < 0.5 * fp8.terms["frozen_fp8_upcast"]
    assert any("without gradient checkpointing" in n for n in fp8.notes)


def test_sd3_architecture_builds_and_its_24gb_tier_trains_on_a_24gb_card():
    from controlnet_recipe.planning.measure import _FAKE, _models

    tier = load_config("params.yaml").tiers["sd3-24gb"]
    recipe = _transformer_recipe("auto", SD35_MEDIUM)
    spec = plan.step_spec(recipe, tier)
    assert (spec.arch, spec.controlnet_layers) == ("sd35-medium", (12, 0)) and plan.arch_family(spec.arch) == "sd3"
    with _FAKE:
        m = _models(spec)
    blocks = m.transformer.transformer_blocks
    assert len(blocks) == 24 and sum(b.attn2 is not None for b in blocks) == 13  # dual attention in 0-12
    assert len(m.controlnet.transformer_blocks) == 12 and m.controlnet.config.extra_conditioning_channels == 0
    assert 2.2e9 < sum(p.numel() for p in m.transformer.parameters()) < 2.3e9  # SD3.5-medium: 2.24B + its pos_embed table
    assert {"text_encoder", "text_encoder_2", "text_encoder_3", "vae"} <= set(m.for_validation)
    p = plan.plan_tier(recipe, "sd3-24gb", tier)
    assert p.peak_gib <= p.budget_gib, p.terms
    with pytest.raises(ConfigError, match="base.family: flux"):
        plan.architecture(SD35_MEDIUM, "flux")


def test_plan_cli_prints_the_transformer_tiers(monkeypatch, capsys):
    cfg = load_config("params.yaml", {"recipe": "faces"})
    planned = []

    def fake_plan(recipe, name, tier, arch, flops=False):
        planned.append((name, arch))
        return plan.TierPlan(name, tier.batch_size, 1, 24.0, 1.0, 1.0, {"allocator_overhead": 0.1, "cuda_context": 0.5}, {})

    monkeypatch.setattr(plan_cli, "plan_tier", fake_plan)
    for family, model, arch in (("flux", FLUX_DEV, "flux1-dev"), ("sd3", SD35_MEDIUM, "sd35-medium")):
        planned.clear()
        flux = Config(recipe_name=family, recipe=_transformer_recipe(family, model), gpu="auto", tiers=cfg.tiers)
        assert plan_cli.main(flux, []) == 0
        out = capsys.readouterr().out
        mine = [t for t, x in cfg.tiers.items() if x.family == family]
        assert [n for n, _ in planned] == mine and {a for _, a in planned} == {arch}
        assert all(f"\n{t} " in out for t in mine) and "\n24gb " not in out
    assert "ControlNet 12 blocks" in out


def test_plan_cli_prints_the_flux_24gb_plan(capsys, monkeypatch):
    monkeypatch.setattr(plan, "step_flops", lambda spec: {"model": 10**13, "hardware": 10**13})  # memory alone here
    cfg = load_config("params.yaml", {"recipe": "faces"})
    flux = Config(recipe_name="flux", recipe=_transformer_recipe("flux", FLUX_DEV), gpu="flux-24gb", tiers=cfg.tiers)
    assert plan_cli.main(flux, []) == 0
    out = capsys.readouterr().out
    assert "(flux1-dev), 512 px" in out and "ControlNet 4 double-stream + 0 single-stream blocks" in out
    row = next(line for line in out.splitlines() if line.startswith("flux-24gb "))
    fp8, _ = _flux_24gb_plans()
    assert f"{fp8.peak_gib:.2f}" in row and "fp8-upcast" in row


def test_the_sharded_flux_tier_holds_an_eighth_of_the_frozen_transformer_per_gpu():
    """flux-40gb-sharded (planned on 8 GPUs): each holds 1/8 of FLUX.1-dev's frozen weights plus
    two gathered blocks (the one running and the one prefetched), and DDP's gradient buckets."""
    tier = load_config("params.yaml").tiers["flux-40gb-sharded"]
    recipe = _transformer_recipe("flux", FLUX_DEV)
    sharded = plan.plan_tier(recipe, "flux-40gb-sharded", tier)
    whole = plan.plan_tier(recipe, "flux-40gb-sharded", tier.model_copy(update={"shard_frozen": False}))
    frozen = whole.terms["weights_transformer_bf16"]
    assert 21 < frozen < 23  # FLUX.1-dev's 11.9B parameters in bf16
    assert sharded.terms["weights_transformer_bf16"] == pytest.approx(frozen / plan.SHARDED_PROCESSES, rel=1e-3)
    block = 339.7e6 * 2 / 1024**3  # a double-stream block's parameters in bf16
    assert sharded.terms["fsdp_gathered_blocks"] == pytest.approx(2 * block, rel=0.01)
    assert sharded.terms["ddp_buckets"] >= sharded.terms["gradients"]  # a bucket for every gradient
    assert sharded.fits and not whole.fits  # one 40 GB card cannot hold the whole FLUX beside its ControlNet
    assert "sharded over 8 processes" in sharded.notes[0]


def test_plans_header_counts_copied_blocks_only_for_a_kind_that_copies_them():
    cfg = load_config("params.yaml", {"recipe": "faces"})
    flux = Config(recipe_name="flux", recipe=_transformer_recipe("flux", FLUX_DEV), gpu="flux-24gb", tiers=cfg.tiers)
    header = {kind: plan_cli.render(plan_cli.with_overrides(flux, kind, None), "flux1-dev", []).splitlines()[0]
              for kind in ("controlnet_lora", "control_lora")}  # fmt: skip
    assert header["controlnet_lora"].endswith(
        "ControlNet-LoRA 4 double-stream + 0 single-stream blocks, validation 4 image(s) per prompt"
    )  # noqa: E501
    assert "blocks" not in header["control_lora"]


# Aspect-ratio buckets (data.buckets): the step planned at the largest bucket, the square one beside it.
def _bucketed(recipe, buckets):
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"buckets": buckets})})


def test_buckets_off_plan_the_square_step_as_before(capsys):
    cfg = load_config("params.yaml", {"gpu": "80gb"})  # the demo: tiny base, 64 px, buckets off
    tier = cfg.tiers["80gb"]
    assert cfg.recipe.data.buckets == "off" and plan.planned_bucket(cfg.recipe) is None
    spec = plan.step_spec(cfg.recipe, tier, "tiny")
    assert spec.size is None and spec.step_size == spec.validation_size == (64, 64)
    off = plan.plan_tier(cfg.recipe, "80gb", tier, "tiny")
    assert off.bucket is None and off.square_peak_gib is None
    assert {"bucket", "square_peak_gib"}.isdisjoint(off.as_dict())
    # a square bucket at the resolution is the same step: the same numbers
    same = plan.plan_tier(_bucketed(cfg.recipe, ["64x64"]), "80gb", tier, "tiny")
    assert (same.peak_gib, same.validation_peak_gib, same.terms) == (off.peak_gib, off.validation_peak_gib, off.terms)
    assert same.square_peak_gib == off.peak_gib
    assert plan_cli.main(cfg, []) == 0
    out = capsys.readouterr().out.splitlines()
    assert ", 64 px, effective batch" in out[0] and "bucket" not in "\n".join(out)
    assert out[1].split()[:9] == ["tier", "adapter", "trained", "batch", "TFLOP/sample", "peak", "GiB", "val", "GiB"]


def test_the_largest_bucket_is_planned_beside_the_square_step(capsys):
    cfg = load_config("params.yaml", {"gpu": "80gb"})
    tier = cfg.tiers["80gb"]
    recipe = _bucketed(cfg.recipe, ["64x64", "96x80", "80x48"])  # 96x80: more pixels than 64²
    assert plan.planned_bucket(recipe) == (96, 80) and plan.step_spec(recipe, tier, "tiny").step_size == (96, 80)
    square = plan.plan_tier(cfg.recipe, "80gb", tier, "tiny")
    p = plan.plan_tier(recipe, "80gb", tier, "tiny")
    assert p.bucket == (96, 80) and p.square_peak_gib == square.peak_gib
    assert p.peak_gib > square.peak_gib and p.terms["activations"] > square.terms["activations"]
    bucketed = cfg.model_copy(update={"recipe": recipe})
    assert plan_cli.main(bucketed, []) == 0
    out = capsys.readouterr().out.splitlines()
    assert "64 px, largest bucket 96x80" in out[0] and "square GiB" in out[1]
    row = next(line for line in out if line.startswith("80gb "))
    assert row.split()[5:7] == [f"{p.peak_gib:.2f}", f"{square.peak_gib:.2f}"]
    assert plan_cli.main(bucketed, ["--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["bucket"] == "96x80" and row["peak_gib"] == round(p.peak_gib, 3)
    assert row["square_peak_gib"] == round(square.peak_gib, 3)
    # gpu: auto judges the largest bucket's step
    _tier, fitted, why = fit.fit_tier(recipe, 80 * 1024**3, bf16=True, arch="tiny")
    assert fitted.bucket == (96, 80) and "at the largest bucket 96x80" in why


def test_a_non_square_step_takes_its_width_and_height_apart():
    """The tiny SD step at W x H: between the squares of its sides, and the same turned on its side
    (a side taken for both would make 96x64 and 64x96 differ)."""
    kw = dict(arch="tiny", resolution=64, micro_batch=2, mixed_precision="no")
    peak = {size: measure(StepSpec(**kw, size=size)).step_peak for size in ((64, 64), (96, 64), (64, 96), (96, 96))}
    assert peak[(64, 64)] < peak[(96, 64)] == peak[(64, 96)] < peak[(96, 96)]


@pytest.mark.slow  # full-size fake models: about 6 s each
@pytest.mark.parametrize("arch", ["sdxl-base", "flux1-dev", "sd35-medium"])
def test_a_non_square_step_runs_through_each_familys_fake_models(arch: str):
    """Full-size SDXL, Flux (2x2-packed latents) and SD3 (patches) take a W x H step: latents of
    (H/8, W/8), the control as the family takes it, and the step's loss."""
    from controlnet_recipe.planning.measure import _FAKE, _models

    w, h = 256, 128
    spec = StepSpec(arch=arch, resolution=128, size=(w, h), micro_batch=1, mixed_precision="bf16", gradient_checkpointing=True)
    with _FAKE:
        m = _models(spec)
        noised, _, _, control = m.adapter_inputs(1, spec.step_size)
        assert tuple(noised.noisy.shape[-2:]) == (h // 8, w // 8)
        assert tuple(control.shape[-2:]) in ((h, w), (h // 8, w // 8))  # pixels (UNet) or latents (transformers)
        if arch == "flux1-dev":
            assert tuple(m._packed(1).shape[:2]) == (1, (h // 16) * (w // 16)) == (1, len(m._inputs(1)["img_ids"]))
        assert m.training_loss().shape == ()
