"""FLOPs of one training step, counted exactly on fake tensors (``torch.utils.flop_counter``), and
model FLOPs utilisation (MFU) against a card's published peak.

:func:`count_flops` counts what PyTorch's FLOP counter counts (matrix multiplies, convolutions and
attention, forward and backward; 2 FLOPs per multiply-add) for one call of a step function.
:func:`step_flops` runs the planner's own step (``measure._models``: the real architecture at full
size, the ControlNet and the frozen base, the loss and its backward) once on fake tensors:

- ``model``: the step without recomputation (gradient checkpointing off), the FLOPs the MFU
  convention counts (PaLM's appendix B; torchtitan's ``mfu``);
- ``hardware``: the step as the tier runs it (checkpointed blocks run their forward twice).

Both are per sample (the step at micro-batch 1; every FLOP here scales with the batch). The
peaks are the dense (no sparsity) tensor-core figures of each card's datasheet, by dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.families.measured import StepSpec

# Dense tensor-core peaks, TFLOP/s, from the vendors' datasheets (the "with sparsity" figures halved):
# H100 SXM and H200: https://www.nvidia.com/en-us/data-center/h100/, https://www.nvidia.com/en-us/data-center/h200/
# (bf16/fp16 1,979 with sparsity); H100 PCIe 1,513 with sparsity; A100: https://www.nvidia.com/en-us/data-center/a100/
# (312 dense); L40S: https://www.nvidia.com/en-us/data-center/l40s/ (733 with sparsity); L4: 242 with sparsity;
# A10G (AWS G5): 125 dense fp16 (NVIDIA A10 datasheet: 250 with sparsity); RTX 4090: 165.2 dense fp16 with fp32
# accumulate... the Ada whitepaper gives 330.3 with fp16 accumulate; training accumulates in fp32, so 165.2.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7},
    "H100 SXM": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0},
    "L40S": {"bf16": 366.5, "fp16": 366.5, "tf32": 183.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0},
    "A10G": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6},
}
# torch.cuda.get_device_name() -> the table's name (the first match, in this order)
DEVICE_NAMES = (
    ("H200", "H200"),
    ("H100 PCIe", "H100 PCIe"),
    ("H100", "H100 SXM"),  # "NVIDIA H100 80GB HBM3": the SXM part
    ("A100", "A100"),
    ("L40S", "L40S"),
    ("L4", "L4"),
    ("A10G", "A10G"),
    ("4090", "RTX 4090"),
)


def card_of(device_name: str) -> str | None:
    """The peak table's name for a CUDA device name, or None for a card it does not list."""
    return next((card for key, card in DEVICE_NAMES if key in device_name), None)


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The card's dense peak for ``dtype`` (``bf16``, ``fp16``; ``no``/``fp32``: TF32), or None."""
    card = card_of(device_name)
    if card is None:
        return None
    return PEAK_TFLOPS[card].get({"no": "tf32", "fp32": "tf32"}.get(dtype, dtype))


def mfu(samples_per_s: float, flops_per_sample: float, device_name: str, dtype: str) -> float | None:
    """Model FLOPs utilisation: the FLOPs done per second over the card's peak (None: unknown card)."""
    peak = peak_tflops(device_name, dtype)
    return None if peak is None else samples_per_s * flops_per_sample / (peak * 1e12)


def count_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of ``step()`` (it returns a loss) and of the loss's backward."""
    counter = FlopCounterMode(display=False)
    with counter:
        step().backward()
    return int(counter.get_total_flops())


def step_flops(spec: StepSpec) -> dict[str, int]:
    """Per sample: ``model`` and ``hardware`` FLOPs of ``spec``'s training step (see the module's
    doc). The switches that change no FLOP (the dtypes, the optimizer, accumulation, validation's)
    are set aside, so tiers that differ only in them share one count."""
    same = dict(micro_batch=1, accumulation=1, set_grads_to_none=True, adam="fused", validation_images=1)
    # nor does the dtype: counted in fp32, without DeepSpeed or fp8 storage (one build of the models for every tier)
    same.update(mixed_precision="no", deepspeed=False, frozen_fp8=False)
    return _step_flops(replace(spec, **same, validation_resolution=None))


@lru_cache(maxsize=64)
def _step_flops(spec: StepSpec) -> dict[str, int]:
    from .measure import _FAKE, _models

    out = {}
    for what, checkpointing in (("model", False), ("hardware", True))[: 1 + spec.gradient_checkpointing]:
        with _FAKE:
            m = _models(replace(spec, gradient_checkpointing=checkpointing))
            out[what] = count_flops(m.adapter_loss if m.adapter is not None else m.training_loss)
            for p in m.controlnet.parameters():
                p.grad = None
    out.setdefault("hardware", out["model"])
    return out
