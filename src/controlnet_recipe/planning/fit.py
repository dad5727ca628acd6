"""``gpu: auto``: the tier that fits this run on this card, chosen by the planner.

From the fewest memory-saving switches to the most (none; gradient checkpointing; checkpointing
and 8-bit AdamW; for a transformer base (SD3, Flux), then also the frozen transformer in fp8),
the largest micro-batch whose predicted peak, training and validation, stays under the free
memory less ``MARGIN``. The first level with any micro-batch that fits wins: a switch costs more
speed than a smaller micro-batch with accumulation. With aspect-ratio buckets on, the step is
planned at the largest bucket (``plan.step_spec``): a tier that fits it fits every bucket's step.
"""

from __future__ import annotations

from ..core.buckets import name as bucket_name
from ..core.config import ConfigError, Recipe, Tier
from ..models.families import family as family_named
from .plan import GIB, TierPlan, arch_family, architecture, plan_step, step_spec

MARGIN = 0.05  # of the free memory, kept free: other processes, the allocator's bad days
LEVELS = (
    ("no memory-saving switch", {"gradient_checkpointing": False, "use_8bit_adam": False}),
    ("gradient checkpointing", {"gradient_checkpointing": True, "use_8bit_adam": False}),
    ("gradient checkpointing + 8-bit AdamW", {"gradient_checkpointing": True, "use_8bit_adam": True}),
)
TRANSFORMER_LEVELS = (
    (
        "gradient checkpointing + 8-bit AdamW + fp8 frozen transformer",
        {"gradient_checkpointing": True, "use_8bit_adam": True, "frozen_fp8": True},
    ),
)


def micro_batches(effective: int) -> list[int]:
    """The micro-batches that divide the effective batch, largest first."""
    return [b for b in range(effective, 0, -1) if effective % b == 0]


def fit_tier(
    recipe: Recipe, free_bytes: int, bf16: bool, arch: str | None = None, tiers: dict[str, Tier] | None = None
) -> tuple[Tier, TierPlan, str]:
    """(the tier, its plan, why) for ``free_bytes`` of GPU memory; ConfigError if nothing fits
    (naming the family's DeepSpeed tiers among ``tiers``, if any)."""
    budget = free_bytes / GIB * (1 - MARGIN)
    precision = "bf16" if bf16 else "fp16"
    tried = []
    family = arch_family(arch or architecture(recipe.base.pretrained_model, recipe.base.family))
    # a transformer base: its frozen weights in fp8 too (layerwise casting, as the transformer tiers do)
    levels = LEVELS + (TRANSFORMER_LEVELS if family_named(family).denoiser_name == "transformer" else ())
    for what, switches in levels:
        for micro in micro_batches(recipe.train.batch_size):
            tier = Tier(
                family=family,
                memory_gb=None,
                batch_size=micro,
                set_grads_to_none=True,
                mixed_precision=precision,
                attention="sdpa",
                deepspeed=None,
                channels_last=False,
                compile=False,
                **{"frozen_fp8": False, **switches},
            )
            plan = plan_step(step_spec(recipe, tier, arch), use_8bit_adam=tier.use_8bit_adam, name="auto")
            need = max(plan.peak_gib, plan.validation_peak_gib)
            tried.append(f"{what}, micro-batch {micro}: {need:.1f} GiB")
            if need <= budget:
                at = "" if plan.bucket is None else f" at the largest bucket {bucket_name(plan.bucket)}"
                why = (
                    f"{what}, micro-batch {micro} x {plan.accumulation} accumulation, {precision}: predicted "
                    f"{plan.peak_gib:.1f} GiB training{at}, {plan.validation_peak_gib:.1f} GiB validating, "
                    f"under {budget:.1f} GiB ({free_bytes / GIB:.1f} GiB free less {MARGIN:.0%})"
                )
                return tier, plan, why
    zero2 = ", ".join(t for t, x in (tiers or {}).items() if x.family == family and x.deepspeed)
    lower = "a lower data.resolution" + ("" if recipe.data.buckets == "off" else " or smaller data.buckets")
    raise ConfigError(
        f"gpu: auto: nothing fits {free_bytes / GIB:.1f} GiB free (less {MARGIN:.0%}); smallest: {tried[-1]}. "
        + (f"Try a DeepSpeed tier (gpu: {zero2}) or {lower}" if zero2 else f"Try {lower}")
    )


def detect_and_fit(recipe: Recipe, arch: str | None = None, tiers: dict[str, Tier] | None = None) -> tuple[Tier, str]:
    """On the first CUDA device: its free memory, whether it does bf16, and the fitting tier."""
    import torch

    free, _total = torch.cuda.mem_get_info(0)
    tier, _plan, why = fit_tier(recipe, free, torch.cuda.is_bf16_supported(), arch, tiers)
    return tier, why
