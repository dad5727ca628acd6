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

from contextlib import contextmanager, nullcontext
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
    resolution: int  # the square side: validation's images, and the step's unless ``size`` says otherwise
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
    adapter: str = "controlnet"  # the kind of control trained (adapters/); its settings as (key, value) pairs
    adapter_settings: tuple = ()
    quantize: str = "none"  # the frozen base in int8 or nf4 (bitsandbytes); fp8 is frozen_fp8
    # False: validation's prompts encoded before (like training's captions): no text encoder on the GPU
    validation_text_encoders: bool = True
    # the step's images as (width, height) in pixels (an aspect-ratio bucket); None: resolution x resolution
    size: tuple[int, int] | None = None

    @property
    def step_size(self) -> tuple[int, int]:
        """(width, height) of the training step's images."""
        return self.size or (self.resolution, self.resolution)

    @property
    def validation_size(self) -> tuple[int, int]:
        """(width, height) of validation's images: the step's bucket (validation draws each held-out
        condition at its own), else square."""
        if self.size is not None and self.validation_resolution is None:
            return self.size
        side = self.validation_resolution or self.resolution
        return side, side


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


def skip_patterns(model: torch.nn.Module) -> tuple[str, ...]:
    """The layer names diffusers' layerwise casting leaves in the compute dtype (the norms, the
    positional and patch embeddings, the model's own patterns, a LoRA's factors); the base's
    quantisation (training/quantize.py) leaves the same."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
    from peft.tuners.lora.layer import LoraLayer

    patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN)
    patterns += tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    patterns += tuple(getattr(model, "_skip_layerwise_casting_patterns", None) or ())
    return patterns + tuple(LoraLayer.adapter_layer_names)


def frozen_linears(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s frozen ``Linear`` layers that int8 and nf4 quantise: every one, as
    diffusers' bitsandbytes quantiser does (the adaptive norms' projections included), but the
    model's ``_keep_in_fp32_modules`` and a LoRA's factors."""
    import re

    from peft.tuners.lora.layer import LoraLayer

    patterns = (*(getattr(model, "_keep_in_fp32_modules", None) or ()), *LoraLayer.adapter_layer_names)
    return [
        name
        for name, m in model.named_modules()
        if type(m) is torch.nn.Linear
        and not any(p.requires_grad for p in m.parameters())
        and not any(re.search(p, name) for p in patterns)
    ]


def quantized_bytes(scheme: str, shape: tuple[int, int]) -> int:
    """What bitsandbytes stores for a ``shape`` (out, in) weight: int8 (``Int8Params``) one byte per
    value and an fp32 scale per row; nf4 (``Params4bit``, double-quantised statistics) half a byte
    per value, a uint8 absmax per 64 and an fp32 one per 256 of those."""
    n = shape[0] * shape[1]
    if scheme == "int8":
        return n + 4 * shape[0]
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256)


DEQUANT_GROUP = "dequantized"  # int8 and nf4 layers' weights, dequantised for a forward or a backward


def _dequantized(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    w = torch.empty(shape, dtype=dtype)
    if TRACKERS:
        TRACKERS[-1].regroup(w, DEQUANT_GROUP)
    return w


class _QuantizedLinear(torch.autograd.Function):
    """bitsandbytes' matmul as it holds memory: the weight dequantised for the forward and again
    for the input's gradient, only the stored bytes saved between them (MatMul4Bit saves B)."""

    @staticmethod
    def forward(ctx, x, stored, bias, shape, dtype):
        ctx.save_for_backward(stored)
        ctx.shape, ctx.dtype = shape, dtype
        return torch.nn.functional.linear(x.to(dtype), _dequantized(shape, dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype) @ _dequantized(ctx.shape, ctx.dtype), None, None, None, None


def quantize_linears(model: torch.nn.Module, scheme: str, compute_dtype: torch.dtype) -> int:
    """``base.quantize`` int8 or nf4 on fake tensors: each frozen Linear's weight replaced by its
    stored bytes (an int8 or uint8 tensor), its forward a :class:`_QuantizedLinear`. Returns how
    many layers."""
    import types

    names = frozen_linears(model)
    storage = {"int8": torch.int8, "nf4": torch.uint8}[scheme]
    for name in names:
        m = model.get_submodule(name)
        shape = (m.out_features, m.in_features)
        m._parameters["weight"] = torch.nn.Parameter(torch.empty(quantized_bytes(scheme, shape), dtype=storage), False)

        def forward(self, x, shape=shape):
            return _QuantizedLinear.apply(x, self.weight, self.bias, shape, compute_dtype)

        m.forward = types.MethodType(forward, m)
    return len(names)


def layerwise_fp8(model: torch.nn.Module, name: str, compute_dtype: torch.dtype) -> int:
    """diffusers' ``model.enable_layerwise_casting(storage_dtype=float8_e4m3fn, compute_dtype)``:
    the same layers (hooks/layerwise_casting.py: supported leaf layers, skipping those whose name
    matches the default patterns, the model's ``_skip_layerwise_casting_patterns`` or
    ``_keep_in_fp32_modules``), cast to fp8 now, upcast before each forward, cast back after.
    Returns how many parameters it stores in fp8."""
    import re

    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    patterns = skip_patterns(model)
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


def _fake_to(self: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
    """``Module.to`` for fake parameters (which ``_apply`` cannot swap): each parameter's data
    set to the dtype in place, new buffers; the device stays (one fake device)."""
    dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
    if dtype is not None:
        for p in self.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        buffers_to(self, dtype)
    return self


@contextmanager
def fake_casts():
    """``Module.to`` as :func:`_fake_to` meanwhile: what a kind's ``make`` casts (diffusers'
    ``from_unet``, peft's layers) runs on fake parameters."""
    old = torch.nn.Module.to
    torch.nn.Module.to = _fake_to
    try:
        yield
    finally:
        torch.nn.Module.to = old


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
    adapter = None  # the kind of control when not the ControlNet (its module is then ``controlnet``)

    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec
        self.dtype = DTYPES[spec.mixed_precision]
        self.frozen: dict[str, torch.nn.Module] = {}  # on the GPU while training
        self.for_validation: dict[str, torch.nn.Module] = {}  # loaded onto the GPU to validate

    def set_switches(self) -> None:
        """Gradient checkpointing on the ControlNet and the base."""
        for model in (self.controlnet, self.base):
            if not getattr(model, "_supports_gradient_checkpointing", False):  # a T2I-Adapter; Control-LoRA's (in the base)
                continue
            if self.spec.gradient_checkpointing:
                model.enable_gradient_checkpointing()
            else:
                model.disable_gradient_checkpointing()

    def use_adapter(self, fam, kind) -> None:
        """``kind``'s trained module in place of the ControlNet, made from the frozen base as the
        trainer makes it (Control-LoRA's LoRA goes into the base itself)."""
        from types import SimpleNamespace

        from ...core.config import AdapterCfg

        settings = dict(self.spec.adapter_settings)
        layers = self.spec.controlnet_layers or (None, None)
        t = SimpleNamespace(hint_init="random", controlnet_layers=layers[0], controlnet_single_layers=layers[1])
        base = SimpleNamespace(denoiser=self.base, vae=self.vae)
        a = AdapterCfg(**{**dict.fromkeys(AdapterCfg.model_fields), "kind": kind.name, **settings})
        dtype = self.dtype if self.spec.deepspeed else torch.float32
        with fake_casts():
            self.controlnet = build(lambda: kind.make(fam, base, t, a), dtype)
        for p in self.controlnet.parameters():  # as the trainer holds them: trained in fp32, frozen in the run's dtype
            want = dtype if p.requires_grad else self.dtype
            if p.is_floating_point() and p.dtype != want:
                p.data = p.data.to(want)  # in place: a kind whose parameters live in the base shares them
        self.fam, self.adapter = fam, kind

    def adapter_inputs(self, b: int, size: tuple[int, int]):
        """(noised, text, batch, control): one step's inputs as the family's step takes them, for
        ``b`` images of ``size`` (width, height)."""
        raise NotImplementedError

    def adapter_loss(self) -> torch.Tensor:
        """The training step through the kind's own ``residuals`` and ``predict`` (the step the
        trainer runs), on inputs of the step's shapes."""
        noised, text, batch, control = self.adapter_inputs(self.spec.micro_batch, self.spec.step_size)
        with self.autocast():
            r = self.adapter.residuals(self.fam, self.controlnet, noised, text, batch, control, "cpu")
            pred = self.adapter.predict(self.fam, self.base, noised, text, batch, r, self.dtype, "cpu")
        return torch.nn.functional.mse_loss(pred.float(), noised.target.float())

    @torch.no_grad()
    def adapter_forward(self, n: int, size: tuple[int, int]) -> None:
        """Validation's denoising step through the kind (``n``: the batch, guidance included)."""
        noised, text, batch, control = self.adapter_inputs(n, size)
        with self.autocast():
            r = self.adapter.residuals(self.fam, self.controlnet, noised, text, batch, control, "cpu")
            self.adapter.predict(self.fam, self.base, noised, text, batch, r, self.dtype, "cpu")

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def training_loss(self) -> torch.Tensor:
        raise NotImplementedError

    def validate(self) -> None:
        raise NotImplementedError


def encode_control(vae, n: int, size: tuple[int, int], dtype: torch.dtype, slicing: bool) -> torch.Tensor:
    """The transformer pipelines' control image of ``size`` (width, height) through the VAE's
    encoder (``AutoencoderKL.encode``: one image at a time with slicing): ``n`` latents, as the
    denoiser's dtype."""
    w, h = size
    if slicing:
        parts = [vae.encode(torch.rand(1, 3, h, w).to(dtype)).latent_dist.sample() for _ in range(n)]
        return torch.cat(parts).to(dtype)
    return vae.encode(torch.rand(n, 3, h, w).to(dtype)).latent_dist.sample().to(dtype)
