"""The memory plan of a recipe on a tier: the measured step (``measure``) plus the terms that
cannot run on fake tensors, each named, and the assumptions about what lies around PyTorch's
allocations.

    peak = (measured step peak + 8-bit optimizer state + attention workspace + DeepSpeed buffers)
           x (1 + ALLOCATOR_OVERHEAD) + CUDA_CONTEXT_GIB

With aspect-ratio buckets (``data.buckets``) the step is planned at the bucket of the most pixels
(the step that needs the most memory), the square one at ``data.resolution`` beside it; validation
stays square, as the pipeline generates it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..core.buckets import Bucket, largest
from ..core.buckets import name as bucket_name
from ..core.config import ConfigError, Recipe, Tier, accumulation_steps
from .flops import step_flops
from .measure import Measured, StepSpec, measure

GIB = 1024**3
# Assumptions, stated (checked against the GPU check's measurements, docs/benchmarks.md: The GPU check on an H200):
ALLOCATOR_OVERHEAD = 0.10  # the caching allocator reserves about this much above the peak it hands out
CUDA_CONTEXT_GIB = 0.5  # the CUDA context, cuBLAS/cuDNN handles and kernels (lazy loading), outside PyTorch's pools
USABLE_FRACTION = 0.9375  # of a card's nominal size that it reports: 24 GB cards report 22.5-24 GiB, 16 GB 15-16
SHARDED_PROCESSES = 8  # a shard_frozen tier is planned on 8 GPUs (upstream's Flux README: 8 x A100 40 GB)
DEEPSPEED_BUCKET_ELEMENTS = 200_000_000  # configs/deepspeed/zero2.json: reduce_bucket_size
BNB_BLOCK, BNB_MIN_8BIT = (
    256,
    4096,
)  # bitsandbytes' blockwise 8-bit state: one fp32 absmax per 256 values; smaller tensors stay fp32


# The bases the recipes name, and where their configs ship (configs/architectures).
def known_bases() -> dict[str, str]:
    """Hub id -> the shipped architecture folder with its shapes (each folder's model_index.json
    lists its ids under ``_hub_ids``)."""
    import json

    from ..models.architectures import ARCHITECTURES

    out = {}
    for index in sorted(ARCHITECTURES.glob("*/model_index.json")):
        out |= dict.fromkeys(json.loads(index.read_text()).get("_hub_ids", []), index.parent.name)
    return out


def architecture(pretrained_model: str | None, family: str = "auto") -> str:
    """The architecture a recipe's base names: ``tiny`` for the demo's own base, a shipped config
    for a known hub id, or a local diffusers folder as it is. ``family`` (base.family): a known
    base of another family is refused."""
    from pathlib import Path

    if pretrained_model is None:
        arch = "tiny"
    elif pretrained_model in (known := known_bases()):
        arch = known[pretrained_model]
    elif (Path(pretrained_model) / "model_index.json").is_file():
        arch = pretrained_model
    else:
        raise ConfigError(
            f"base.pretrained_model: the planner knows no architecture for {pretrained_model!r}; "
            f"known: {', '.join(known)}, or a local diffusers folder"
        )
    if family != "auto" and arch_family(arch) != family:
        raise ConfigError(
            f"base.family: {family}, but the planner reads {pretrained_model or 'the tiny demo base'} as {arch_family(arch)}"
        )
    return arch


def arch_family(arch: str) -> str:
    """The family of a planner architecture (``tiny``: sd), from its model_index.json."""
    from ..models.families import family_of_architecture

    return family_of_architecture(arch)


def bnb_state_bytes(shapes: list[tuple[int, ...]]) -> int:
    """bitsandbytes' AdamW8bit state (optim/optimizer.py, Optimizer2State.init_state): two uint8
    buffers and two fp32 absmax vectors per tensor of 4096 values or more, two fp32 buffers below."""
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if n < BNB_MIN_8BIT:
            total += 2 * 4 * n
        else:
            total += 2 * n + 2 * 4 * -(-n // BNB_BLOCK)
    return total


@dataclass
class TierPlan:
    tier: str
    micro_batch: int
    accumulation: int
    budget_gib: float | None  # what a card of the tier's size reports; None for the cpu tier
    peak_gib: float
    validation_peak_gib: float
    terms: dict[str, float]  # GiB: they add up to peak_gib
    validation_terms: dict[str, float]  # GiB: they add up to validation_peak_gib
    host_gib: float = 0.0  # CPU memory DeepSpeed's offloaded optimizer holds
    notes: list[str] = field(default_factory=list)
    adapter: str = "controlnet"  # the kind of control planned (adapter.kind)
    trainable_params: int = 0
    bucket: Bucket | None = None  # the step's (width, height) when buckets are on; None: square at resolution
    square_peak_gib: float | None = None  # with a bucket: the same step's peak, square at resolution
    flops_per_sample: dict[str, int] | None = None  # planning/flops.py: the step's model and hardware FLOPs per sample

    @property
    def fits(self) -> bool | None:
        if self.budget_gib is None:
            return None
        return max(self.peak_gib, self.validation_peak_gib) <= self.budget_gib

    def as_dict(self) -> dict:
        bucket = {}
        if self.bucket is not None:
            bucket = {"bucket": bucket_name(self.bucket), "square_peak_gib": round(self.square_peak_gib or 0.0, 3)}
        return {
            "tier": self.tier,
            "adapter": self.adapter,
            "trainable_params": self.trainable_params,
            "micro_batch": self.micro_batch,
            "accumulation": self.accumulation,
            "budget_gib": self.budget_gib,
            "peak_gib": round(self.peak_gib, 3),
            "validation_peak_gib": round(self.validation_peak_gib, 3),
            **bucket,
            **({"flops_per_sample": self.flops_per_sample} if self.flops_per_sample else {}),
            "fits": self.fits,
            "terms": {k: round(v, 4) for k, v in self.terms.items()},
            "validation_terms": {k: round(v, 4) for k, v in self.validation_terms.items()},
            "host_gib": round(self.host_gib, 3),
            "notes": self.notes,
            "assumptions": {
                "allocator_overhead": ALLOCATOR_OVERHEAD,
                "cuda_context_gib": CUDA_CONTEXT_GIB,
                "usable_fraction_of_nominal": USABLE_FRACTION,
            },
        }


def controlnet_layers(recipe: Recipe, family: str) -> tuple[int, int] | None:
    """(blocks, single-stream blocks) a transformer family's ControlNet copies: the train
    section's counts, the family's defaults (``Family.default_layers``) where they are null;
    None for a family whose ControlNet copies a fixed part (a UNet's encoder)."""
    from ..models.families import family as family_named

    if family_named(family).default_layers is None:
        return None
    double, single = family_named(family).default_layers
    double = recipe.train.controlnet_layers or double
    single = single if recipe.train.controlnet_single_layers is None else recipe.train.controlnet_single_layers
    return double, single


def planned_bucket(recipe: Recipe) -> Bucket | None:
    """The (width, height) the planner plans the step at: the largest of the recipe's buckets
    (the most pixels: the most memory), or None when buckets are off (square at resolution)."""
    from ..models.families import recipe_buckets

    buckets = recipe_buckets(recipe)
    return None if buckets is None else largest(buckets)


def step_spec(recipe: Recipe, tier: Tier, arch: str | None = None, **override) -> StepSpec:
    """The train stage's step for ``recipe`` on ``tier`` (``override``: any StepSpec field); with
    buckets on, at the largest bucket."""
    micro, accum = accumulation_steps(recipe.train.batch_size, override.pop("micro_batch", tier.batch_size))
    arch = arch or architecture(recipe.base.pretrained_model, recipe.base.family)
    from ..models.families import family as family_named

    family = arch_family(arch)
    spec = dict(
        arch=arch,
        resolution=recipe.data.resolution,
        size=planned_bucket(recipe),
        micro_batch=micro,
        accumulation=accum,
        mixed_precision=tier.mixed_precision,
        gradient_checkpointing=tier.gradient_checkpointing,
        set_grads_to_none=tier.set_grads_to_none,
        attention=tier.attention,
        adam="none" if tier.use_8bit_adam or tier.deepspeed else "fused",
        deepspeed=tier.deepspeed is not None,
        validation_images=recipe.train.validation.num_images,
        vae_force_upcast=False if recipe.base.vae else None,  # a replacement VAE: the fp16-fixed one
        # base.quantize takes the place of the tier's fp8 storage (as the trainer does): fp8 is the same casting
        frozen_fp8=recipe.base.quantize == "fp8" or (tier.frozen_fp8 and recipe.base.quantize == "none"),
        quantize=recipe.base.quantize if recipe.base.quantize in ("int8", "nf4") else "none",
        max_sequence_length=recipe.base.max_sequence_length,
        # the transformer families' validation encodes its prompts on the CPU (FlowFamily.validation_inputs):
        # only their embeddings and the VAE come to the GPU; SD's and SDXL's pipelines encode there
        validation_text_encoders=family_named(family).encodes_prompts_on_device,
        controlnet_layers=controlnet_layers(recipe, family),
        adapter=recipe.adapter.kind,
        adapter_settings=tuple((k, v) for k, v in recipe.adapter.model_dump().items() if k != "kind" and v is not None),
    )
    return StepSpec(**{**spec, **override})


def _groups_gib(groups: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in groups.items():
        key = "weights_" + k.removeprefix("weights: ").replace(" ", "_") if k.startswith("weights: ") else k
        out[key] = out.get(key, 0.0) + v / GIB
    return {k: v for k, v in out.items() if v > 0}


def _added_terms(
    spec: StepSpec, m: Measured, use_8bit_adam: bool, processes: int, shard_frozen: bool
) -> tuple[dict[str, int], list[str], float]:
    """What the fake run cannot allocate (bytes, by term), the plan's notes, and DeepSpeed's host GiB."""
    extra: dict[str, int] = {}
    notes: list[str] = []
    if shard_frozen and processes > 1:
        extra["fsdp_gathered_blocks"] = 2 * m.frozen_block_bytes
        notes.append(f"the frozen base sharded over {processes} processes")
    if use_8bit_adam:
        extra["optimizer_8bit"] = bnb_state_bytes(m.param_shapes)
    if spec.attention != "math" and m.attention_workspace:
        extra["attention_workspace"] = m.attention_workspace
    host = 0.0
    if processes > 1 and not spec.deepspeed:
        # DDP (gradient_as_bucket_view off, accelerate's default): flat buckets as large as the gradients
        extra["ddp_buckets"] = 4 * m.trainable_params
    if spec.deepspeed:
        # ZeRO-2: two fp16/bf16 gradient buckets (overlap_comm), which the gradients move into as
        # they are produced (measure: none stays on the GPU); fp32 master weights, gradients and
        # both Adam moments of the ControlNet held in host memory (offload_optimizer: cpu)
        extra["deepspeed_buckets"] = 2 * 2 * DEEPSPEED_BUCKET_ELEMENTS
        host = 16 * m.trainable_params / GIB
        notes.append(f"DeepSpeed offload holds {host:.1f} GiB of host memory")
    if spec.attention == "xformers":
        notes.append("xformers planned as PyTorch's memory-efficient SDPA (the same saved tensors)")
    if spec.frozen_fp8 and not spec.gradient_checkpointing:
        notes.append("frozen_fp8 without gradient checkpointing: the backward keeps each layer's upcast copy")
    return extra, notes, host


def plan_step(
    spec: StepSpec,
    *,
    use_8bit_adam: bool = False,
    name: str = "",
    budget_gb: float | None = None,
    processes: int = 1,
    shard_frozen: bool = False,
) -> TierPlan:
    """Measure ``spec`` and add the named terms; ``budget_gb``: the card's nominal size;
    ``processes`` > 1: DistributedDataParallel, whose gradient buckets copy every gradient;
    ``shard_frozen``: the frozen base split across the processes (FSDP2), which gathers a block
    at a time and prefetches the next."""
    m: Measured = measure(spec)
    extra, notes, host = _added_terms(spec, m, use_8bit_adam, processes, shard_frozen)
    frozen_share = 1 / processes if shard_frozen and processes > 1 else 1.0

    def shards(peak: int, groups: dict[str, int]) -> tuple[int, dict[str, int]]:
        """The peak and its groups with each frozen model's weights cut to this process's share."""
        frozen = tuple(f"weights: {n} " for n in m.frozen_names)
        cut = {k: (int(v * frozen_share) if k.startswith(frozen) else v) for k, v in groups.items()}
        return peak - sum(groups.values()) + sum(cut.values()), cut

    def total(peak: int, groups: dict[str, int]) -> tuple[float, dict[str, float]]:
        peak, groups = shards(peak, groups)
        terms = _groups_gib(groups)
        for k, v in extra.items():
            terms[k] = terms.get(k, 0.0) + v / GIB
        allocated = (peak + sum(extra.values())) / GIB
        # the groups at the peak add up to the peak (rounding aside): activations take the remainder
        terms["activations"] = terms.get("activations", 0.0) + allocated - sum(terms.values())
        terms["allocator_overhead"] = allocated * ALLOCATOR_OVERHEAD
        terms["cuda_context"] = CUDA_CONTEXT_GIB
        return sum(terms.values()), terms

    peak, terms = total(m.step_peak, m.step_groups)
    vgroups = dict(m.validation_groups)
    if not spec.empty_cache_before_validation:
        # Without empty_cache the blocks the step's activations freed stay reserved: validation's own
        # activations (the same models' tensors) reuse them, the weights it loads come on top.
        reused = m.validation_peak - m.validation_weights
        vgroups["cached_training_blocks"] = max(0, m.step_peak - reused)
    vpeak, vterms = total(m.validation_peak + vgroups.get("cached_training_blocks", 0), vgroups)
    vterms.pop("attention_workspace", None)  # no backward in validation
    vpeak = sum(vterms.values())
    return TierPlan(
        tier=name,
        micro_batch=spec.micro_batch,
        accumulation=spec.accumulation,
        budget_gib=None if budget_gb is None else budget_gb * USABLE_FRACTION,
        peak_gib=peak,
        validation_peak_gib=vpeak,
        terms=terms,
        validation_terms=vterms,
        host_gib=host,
        notes=notes,
        adapter=spec.adapter,
        trainable_params=m.trainable_params,
        bucket=spec.size,
    )


def plan_tier(recipe: Recipe, name: str, tier: Tier, arch: str | None = None, flops: bool = False) -> TierPlan:
    """``recipe``'s plan on ``tier``: with buckets on, at the largest bucket (what ``fits`` judges),
    with the square step's peak beside it (``square_peak_gib``); ``flops``: and the step's FLOPs
    per sample (planning/flops.py; a fake-tensor run more)."""
    spec = step_spec(recipe, tier, arch)
    processes = SHARDED_PROCESSES if tier.shard_frozen else 1
    kw = dict(use_8bit_adam=tier.use_8bit_adam, name=name, budget_gb=tier.memory_gb, processes=processes)
    kw["shard_frozen"] = tier.shard_frozen
    p = plan_step(spec, **kw)
    if spec.size is not None:  # the square step at the resolution, beside the bucket's (the same step if square)
        square = p if spec.size == (spec.resolution,) * 2 else plan_step(replace(spec, size=None), **kw)
        p.square_peak_gib = square.peak_gib
    if flops:
        p.flops_per_sample = step_flops(spec)
    return p
