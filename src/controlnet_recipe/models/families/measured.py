"""What a family hands the GPU-memory planner (planning/measure.py): its modules, built at full size
on fake tensors (:class:`MeasuredModels`), for one training step described by :class:`StepSpec`.

``frozen_fp8`` (diffusers' ``enable_layerwise_casting``: the frozen base's weights stored in
float8_e4m3fn, each layer upcast to the compute dtype for its forward) runs here as diffusers runs
it, with the same choice of layers (norms, embeddings and the model's own skip patterns stay in the
compute dtype). Its upcast copies are counted as they live: one layer's at a time without
gradients, but a layer whose input needs a gradient leaves its copy saved for the backward, so
without gradient checkpointing every such layer's copy stays until the backward reaches it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP8 = torch.float8_e4m3fn
UPCAST_GROUP = "frozen_fp8_upcast"  # the compute-dtype copies layerwise casting makes
# the planner's LiveMemory while a measurement runs (layerwise casting's hooks regroup into it)
TRACKERS: list = []


@dataclass(frozen=True)
class StepSpec:
    """Everything a training step's memory depends on."""

    arch: str  # a folder of configs/architectures, a diffusers model folder, or "tiny" (the demo's base)
    resolution: int
    micro_batch: int
    accumulation: int = 1
    mixed_precision: str = "fp16"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    set_grads_to_none: bool = True
    attention: str = "sdpa"  # sdpa, xformers (both: fused kernels, nothing quadratic kept) | math (scores materialised)
    adam: str = "fused"  # fused (the recipe) | foreach (upstream's torch.optim.AdamW on CUDA) | none (8-bit, DeepSpeed)
    deepspeed: bool = False  # the ControlNet held in the half dtype by DeepSpeed, its gradients and optimizer on the CPU
    per_step_encoding: bool = False  # upstream: VAE (+ text encoder) on the GPU, run every step
    validation_images: int = 1
    validation_resolution: int | None = None  # None: the training resolution
    # the recipe empties PyTorch's cache before validating; upstream does not, so the blocks that
    # held the step's activations stay reserved (fragmented) under what validation loads
    empty_cache_before_validation: bool = True
    vae_slicing: bool = True  # the recipe decodes validation images one at a time on a GPU; upstream one per call
    # SDXL pipelines decode in fp32 when the VAE's config says force_upcast (SDXL's own VAE); None:
    # as the architecture's config says; False: a replacement VAE that is fp16-safe (the fp16-fixed one)
    vae_force_upcast: bool | None = None
    # a transformer family's ControlNet: (blocks, single-stream blocks) copied; None: the family's default
    controlnet_layers: tuple[int, int] | None = None
    max_sequence_length: int | None = None  # T5 tokens (sd3, flux); None: the family's default
    frozen_fp8: bool = False  # the frozen base's weights in fp8, layerwise upcast (diffusers' layerwise casting)
    # False: validation's prompts encoded before (like training's captions): no text encoder on the GPU
    validation_text_encoders: bool = True


def _swap_params(module: torch.nn.Module, dtype: torch.dtype, group: str) -> None:
    """``module.to(dtype)`` as layerwise casting calls it, for fake parameters (which cannot be
    swapped in place): new parameters; what autograd saved of the old ones stays alive, as the
    storage behind a real ``param.data`` does."""
    for name, p in list(module._parameters.items()):
        if p is not None and p.is_floating_point() and p.dtype != dtype:
            new = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
            module._parameters[name] = new
            if TRACKERS:
                TRACKERS[-1].regroup(new, group)


def layerwise_fp8(model: torch.nn.Module, name: str, compute_dtype: torch.dtype) -> int:
    """diffusers' ``model.enable_layerwise_casting(storage_dtype=float8_e4m3fn, compute_dtype)``:
    the same layers (hooks/layerwise_casting.py: supported leaf layers, skipping those whose name
    matches the default patterns, the model's ``_skip_layerwise_casting_patterns`` or
    ``_keep_in_fp32_modules``), cast to fp8 now, upcast before each forward, cast back after.
    Returns how many parameters it stores in fp8."""
    import re

    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN)
    patterns += tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    patterns += tuple(getattr(model, "_skip_layerwise_casting_patterns", None) or ())
    weights = f"weights: {name} fp8"
    count = 0

    def pre(module, args):
        _swap_params(module, compute_dtype, UPCAST_GROUP)

    def post(module, args, output):
        _swap_params(module, FP8, weights)

    def walk(module: torch.nn.Module, prefix: str) -> None:
        nonlocal count
        if any(re.search(p, prefix) for p in patterns):
            return
        if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            _swap_params(module, FP8, weights)
            count += sum(p.numel() for p in module.parameters(recurse=False))
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)
            return
        for child_name, child in module.named_children():
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(model, "")
    return count


def build(builder, dtype: torch.dtype):
    """Build a module with ``dtype`` as the default (casting afterwards cannot swap fake parameters)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return builder()
    finally:
        torch.set_default_dtype(old)


def buffers_to(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating buffers that a model builds in fp32 whatever the default dtype (PatchEmbed's
    positional table), as ``model.to(dtype)`` would (fake tensors: new buffers, not in place)."""
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                mod._buffers[name] = buf.to(dtype)


class MeasuredModels:
    """The modules of one architecture on fake tensors, and how to run them: a family's subclass
    builds them from ``spec`` and runs one training step's loss and one validation pass."""

    device_type = "cpu"  # autocast's: the GPU check runs these models for real on "cuda"
    upcast_vae = None  # the VAE the pipeline decodes with, when it upcasts

    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec
        self.dtype = DTYPES[spec.mixed_precision]
        self.frozen: dict[str, torch.nn.Module] = {}  # on the GPU while training
        self.for_validation: dict[str, torch.nn.Module] = {}  # loaded onto the GPU to validate

    def set_switches(self) -> None:
        """Gradient checkpointing on the ControlNet and the base."""
        for model in (self.controlnet, self.base):
            if self.spec.gradient_checkpointing:
                model.enable_gradient_checkpointing()
            else:
                model.disable_gradient_checkpointing()

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def training_loss(self) -> torch.Tensor:
        raise NotImplementedError

    def validate(self) -> None:
        raise NotImplementedError


def encode_control(vae, n: int, res: int, dtype: torch.dtype, slicing: bool) -> torch.Tensor:
    """The transformer pipelines' control image through the VAE's encoder (``AutoencoderKL.encode``:
    one image at a time with slicing): ``n`` latents, as the denoiser's dtype."""
    if slicing:
        parts = [vae.encode(torch.rand(1, 3, res, res).to(dtype)).latent_dist.sample() for _ in range(n)]
        return torch.cat(parts).to(dtype)
    return vae.encode(torch.rand(n, 3, res, res).to(dtype)).latent_dist.sample().to(dtype)
