"""``python -m controlnet_recipe plan [--gpu TIER] [--json]``: the predicted peak GPU memory of
the recipe's training step and validation on every tier, without a GPU or any download. A
transformer base (``sd3``, ``flux``) is planned on its family's tiers (``sd3-*``, ``flux-*``); the
other bases on the rest. With aspect-ratio buckets on (``data.buckets``), each tier's step is planned
at the largest bucket (the peak its fit is judged by), the square one at the resolution beside it.
Each tier's step is also counted in FLOPs per sample on fake tensors (planning/flops.py): the
model's, and where the tier checkpoints, with the recomputed forward."""

from __future__ import annotations

import argparse
import json
import sys

from ..adapters import adapter
from ..core.buckets import name as bucket_name
from ..core.config import Config, Tier, check_tier
from ..models.families import family as family_named
from .plan import (
    ALLOCATOR_OVERHEAD,
    CUDA_CONTEXT_GIB,
    USABLE_FRACTION,
    TierPlan,
    arch_family,
    architecture,
    controlnet_layers,
    plan_tier,
)

SHORT = {
    "gradients": "grads",
    "optimizer": "adam",
    "optimizer_8bit": "adam8bit",
    "activations": "act",
    "frozen_fp8_upcast": "fp8-upcast",
    "deepspeed_buckets": "ds-buckets",
    "dequantized": "dequant",
}


def tiers_for(family: str, tiers: dict[str, Tier]) -> list[str]:
    """The tiers a base of ``family`` is planned on: a transformer family's own; for a UNet family
    every tier of a UNet family, and the tiers of no family (cpu)."""
    denoiser = family_named(family).denoiser_name
    if denoiser == "transformer":
        return [t for t, x in tiers.items() if x.family == family]
    return [t for t, x in tiers.items() if x.family is None or family_named(x.family).denoiser_name == denoiser]


def _terms(p: TierPlan) -> str:
    weights = sum(v for k, v in p.terms.items() if k.startswith("weights_"))
    parts = [f"weights {weights:.2f}"]
    for k, v in p.terms.items():
        if not k.startswith("weights_") and k not in ("allocator_overhead", "cuda_context"):
            parts.append(f"{SHORT.get(k, k)} {v:.2f}")
    parts.append(f"alloc+ctx {p.terms['allocator_overhead'] + p.terms['cuda_context']:.2f}")
    return ", ".join(parts)


def _flops(p: TierPlan) -> str:
    """The step's TFLOP per sample: the model's, and with recomputation (checkpointing) what the tier runs."""
    if not p.flops_per_sample:
        return "-"
    model, hardware = (p.flops_per_sample[k] / 1e12 for k in ("model", "hardware"))
    return f"{model:.3g}" if hardware == model else f"{model:.3g}/{hardware:.3g}"


def _bucket(plans: list[TierPlan]) -> str | None:
    """The largest bucket's name (``WxH``) when the plans are at one, else None."""
    return next((bucket_name(p.bucket) for p in plans if p.bucket is not None), None)


def render(cfg: Config, arch: str, plans: list[TierPlan]) -> str:
    """The plans as a table under a header naming the recipe, its base and its sizes; with buckets,
    ``peak GiB`` is the largest bucket's and ``square GiB`` the square step's at the resolution."""
    r = cfg.recipe
    family = arch_family(arch)
    copied, kind = controlnet_layers(r, family), adapter(r.adapter.kind)
    layers = f", {kind.title} {family_named(family).describe_layers(*copied)}" if copied and kind.copies_blocks else ""
    width = max([10, *(len(p.tier) for p in plans)])
    kind = max([7, *(len(p.adapter) for p in plans)])
    bucket, res = _bucket(plans), r.data.resolution
    sizes = f"{res} px" if bucket is None else f"{res} px, largest bucket {bucket} (peak GiB; square GiB: {res}x{res})"
    lines = [
        f"recipe {cfg.recipe_name}: base {r.base.pretrained_model or 'the tiny demo base'} ({arch}), "
        f"{sizes}, effective batch {r.train.batch_size}{layers}, "
        f"validation {r.train.validation.num_images} image(s) per prompt",
        f"{'tier':<{width}} {'adapter':<{kind}} {'trained':>8} {'batch':>6} {'TFLOP/sample':>13} {'peak GiB':>9} "
        + ("" if bucket is None else f"{'square GiB':>10} ")
        + f"{'val GiB':>8} {'card GiB':>9} {'fits':<5} terms (GiB, at the training peak)",
    ]
    for p in plans:
        budget = "-" if p.budget_gib is None else f"{p.budget_gib:.1f}"
        fits = {None: "-", True: "yes", False: "NO"}[p.fits]
        square = "" if bucket is None else f"{'-' if p.square_peak_gib is None else f'{p.square_peak_gib:.2f}':>10} "
        lines.append(
            f"{p.tier:<{width}} {p.adapter:<{kind}} {p.trainable_params / 1e6:>7.1f}M {p.micro_batch:>3}x{p.accumulation:<2} "
            f"{_flops(p):>13} {p.peak_gib:>9.2f} {square}{p.validation_peak_gib:>8.2f} {budget:>9} {fits:<5} {_terms(p)}"
            + (f"  [{'; '.join(p.notes)}]" if p.notes else "")
        )
    lines.append(
        f"assumptions: allocator overhead {ALLOCATOR_OVERHEAD:.0%} of the allocated peak, CUDA context "
        f"{CUDA_CONTEXT_GIB} GiB, a card reports {USABLE_FRACTION:.1%} of its nominal size"
    )
    return "\n".join(lines)


def with_overrides(cfg: Config, kind: str | None, quantize: str | None) -> Config:
    """``cfg`` with the recipe's adapter kind and base quantisation replaced where given."""
    r = cfg.recipe
    if kind:
        adapter(kind)  # a known kind, or one line naming them
        r = r.model_copy(update={"adapter": r.adapter.model_copy(update={"kind": kind})})
    if quantize:
        r = r.model_copy(update={"base": r.base.model_copy(update={"quantize": quantize})})
    return cfg.model_copy(update={"recipe": r})


def main(cfg: Config, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="controlnet-recipe plan", description=__doc__)
    p.add_argument("--json", action="store_true", help="one JSON object per tier")
    p.add_argument("--adapter", default=None, help="plan this kind of control (adapter.kind) instead of the recipe's")
    p.add_argument("--quantize", default=None, choices=("none", "fp8", "int8", "nf4"), help="with this base.quantize")
    args = p.parse_args(argv)
    cfg = with_overrides(cfg, args.adapter, args.quantize)
    arch = architecture(cfg.recipe.base.pretrained_model, cfg.recipe.base.family)  # a one-line error for an unknown base
    if cfg.gpu == "auto":
        names = tiers_for(arch_family(arch), cfg.tiers)
    else:
        check_tier(cfg.gpu, cfg.recipe.base.family, cfg.tiers)
        names = [cfg.gpu]
    plans = []
    for i, name in enumerate(names):
        if not args.json and sys.stderr.isatty():
            print(f"\rplan: measuring tier {name} ({i + 1}/{len(names)}) on fake tensors...", end="", file=sys.stderr, flush=True)
        plans.append(plan_tier(cfg.recipe, name, cfg.tiers[name], arch, flops=True))
    if not args.json and sys.stderr.isatty():
        print("\r" + " " * 70 + "\r", end="", file=sys.stderr)
    if args.json:
        for plan in plans:
            print(json.dumps(plan.as_dict()))
    else:
        print(render(cfg, arch, plans))
    return 0
