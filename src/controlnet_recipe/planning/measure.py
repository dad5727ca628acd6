"""One training step and one validation pass of the real architecture, run on fake tensors under
:class:`~.tracker.LiveMemory`: what they allocate, by group, at their peaks. The models are the
family's (``Family.measured``: models/families/measured.py and each family's module).

The step is the train stage's (latent cache: neither VAE nor text encoder on the GPU) or
upstream's (``per_step_encoding``: the VAE, and for SD 1.x/2.x the text encoder, on the GPU and
run on every step). The frozen base is held in the mixed-precision dtype, the ControlNet in fp32
under autocast, as both scripts do. Two optimizer steps run, so the second one's forward sees what
stays between steps: the optimizer state, and the gradients unless they are set to None.
bitsandbytes' 8-bit state and DeepSpeed's buffers cannot run on fake tensors: ``terms`` adds them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..models.families import family, family_of_architecture
from ..models.families.measured import (
    DTYPES,
    FP8,
    TRACKERS,
    UPCAST_GROUP,
    MeasuredModels,
    StepSpec,
    layerwise_fp8,
    quantize_linears,
)
from ..training.memory import frozen_blocks, local_bytes
from .tracker import LiveMemory

__all__ = ["DTYPES", "UPCAST_GROUP", "Measured", "StepSpec", "layerwise_fp8", "measure", "spec_dict"]


@dataclass
class Measured:
    """Peak allocated bytes of the step and of validation, each with its groups at that moment."""

    step_peak: int
    step_groups: dict[str, int]
    validation_peak: int
    validation_groups: dict[str, int]
    validation_start: int  # what stays allocated between the last step and validation
    validation_weights: int  # what validation loads onto the GPU (VAE, text encoders)
    attention_workspace: int
    weights: dict[str, int]  # "<model> <dtype>" -> bytes
    trainable_params: int
    param_shapes: list[tuple[int, ...]]  # the ControlNet's trainable tensors (bitsandbytes' state)
    frozen_names: tuple[str, ...] = ()  # the frozen models' names in the weight groups ("weights: <name> <dtype>")
    frozen_block_bytes: int = 0  # the frozen models' largest block (their _no_split_modules): what FSDP gathers at once


def _dtype_name(dtype: torch.dtype) -> str:
    return {
        torch.float32: "fp32",
        torch.float16: "fp16",
        torch.bfloat16: "bf16",
        FP8: "fp8",
        torch.int8: "int8",
        torch.uint8: "nf4",
    }[dtype]


def _norm_in_fp32(self, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm/LayerNorm as CUDA's autocast runs them: half inputs cast up, the output fp32 (CPU
    autocast, which the fake run has, leaves them in half)."""
    if torch.is_autocast_enabled("cpu") and x.dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            w = None if self.weight is None else self.weight.float()
            b = None if self.bias is None else self.bias.float()
            if isinstance(self, torch.nn.GroupNorm):
                return torch.nn.functional.group_norm(x.float(), self.num_groups, w, b, self.eps)
            return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)
    return type(self).forward(self, x)


def cuda_autocast_norms(*models: torch.nn.Module) -> None:
    """Give the models' norms CUDA's autocast behaviour (per instance, so checkpointing's
    recomputation runs the same code)."""
    import types

    for model in models:
        for mod in model.modules():
            if type(mod) in (torch.nn.GroupNorm, torch.nn.LayerNorm):
                mod.forward = types.MethodType(_norm_in_fp32, mod)


_FAKE = FakeTensorMode(allow_non_fake_inputs=True)  # one for the process: its models serve every spec
_BUILT: dict[tuple, MeasuredModels] = {}


def _models(spec: StepSpec) -> MeasuredModels:
    """The models for ``spec``, built once per architecture, dtype and placement; the switches
    (checkpointing, attention, batch) are set on them for each spec."""
    key = (
        spec.arch,
        spec.mixed_precision,
        spec.deepspeed,
        spec.per_step_encoding,
        spec.controlnet_layers,
        spec.vae_force_upcast,
        spec.frozen_fp8,
        spec.adapter,
        spec.adapter_settings,
        spec.quantize,
    )
    m = _BUILT.get(key)
    if m is None:
        fam = family(family_of_architecture(spec.arch))
        if spec.adapter == "controlnet":
            m = _BUILT[key] = fam.measured(spec)
        else:  # another kind of control: its module, made from the base before its fp8 cast, as the trainer does
            from dataclasses import replace

            from ..adapters import adapter

            m = _BUILT[key] = fam.measured(replace(spec, frozen_fp8=False))
            m.use_adapter(fam, adapter(spec.adapter))
            if spec.frozen_fp8:
                layerwise_fp8(m.base, next(k for k, v in m.frozen.items() if v is m.base), m.dtype)
        if spec.quantize != "none":  # after the kind's module is made: it copies (or wraps) the base first
            quantize_linears(m.base, spec.quantize, m.dtype)
        cuda_autocast_norms(m.controlnet, *m.frozen.values(), *m.for_validation.values())
    m.spec = spec
    m.set_switches()
    for p in m.controlnet.parameters():
        p.grad = None
    m.controlnet.train()
    return m


def _register_weights(mem: LiveMemory, models: dict[str, torch.nn.Module]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for name, module in models.items():
        for t in (*module.parameters(), *module.buffers()):
            stored = t.is_floating_point() or t.dtype in (torch.int8, torch.uint8)  # int8, nf4: quantised weights
            key = f"{name} {_dtype_name(t.dtype)}" if stored else f"{name} other"
            before = mem.groups[f"weights: {key}"]
            mem.register(t, f"weights: {key}")
            weights[key] = weights.get(key, 0) + mem.groups[f"weights: {key}"] - before
    return weights


def _train_steps(m: MeasuredModels, mem: LiveMemory, spec: StepSpec):
    """Two optimizer steps; returns the optimizer (its state stays allocated through validation)."""
    params = [p for p in m.controlnet.parameters() if p.requires_grad]
    opt = None
    if spec.adam != "none":
        kw = {"fused": True} if spec.adam == "fused" else {"foreach": True}
        opt = torch.optim.AdamW(params, lr=1e-5, **kw)

    def gradient_ready(p: torch.Tensor) -> None:
        if spec.deepspeed:
            # ZeRO-2 with the optimizer offloaded (deepspeed/runtime/zero/stage_1_and_2.py,
            # reduce_independent_p_g_buckets_and_remove_grads, copy_grads_in_partition): each
            # gradient is copied into the reduce bucket (``terms``' deepspeed_buckets) as it is
            # produced, its own storage freed, and the bucket emptied to the CPU's fp32 partition
            p.grad = None
        else:
            mem.regroup(p.grad, "gradients")

    hooks = [p.register_post_accumulate_grad_hook(gradient_ready) for p in params]
    keep_grads = not spec.set_grads_to_none or spec.accumulation > 1  # accumulation keeps them between micro-steps
    for _ in range(2):
        loss = m.adapter_loss() if m.adapter is not None else m.training_loss()
        loss.backward()
        del loss
        if not spec.deepspeed:  # DeepSpeed clips the CPU partition
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        if opt is not None:
            opt.step()
            for state in opt.state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor) and t.numel() > 1:
                        mem.regroup(t, "optimizer")
        if not keep_grads:
            for p in params:
                p.grad = None
    for h in hooks:
        h.remove()
    return opt


@lru_cache(maxsize=64)
def measure(spec: StepSpec) -> Measured:
    """Run ``spec``'s training step twice and one validation pass on fake tensors; the peaks."""
    with _FAKE:
        m = _models(spec)
        mem = LiveMemory()
        TRACKERS.append(mem)  # layerwise casting's hooks file their copies here
        try:
            with mem:
                weights = _register_weights(mem, {spec.adapter: m.controlnet, **m.frozen})
                opt = _train_steps(m, mem, spec)
                step_peak, step_groups = mem.peak, dict(mem.peak_groups)
                if spec.set_grads_to_none:
                    for p in m.controlnet.parameters():
                        p.grad = None
                mem.reset_peak()
                validation_start = mem.current
                loading = m.for_validation
                if not spec.validation_text_encoders:
                    loading = {k: v for k, v in loading.items() if not k.startswith("text_encoder")}
                loaded = _register_weights(mem, loading)
                weights.update(loaded)
                m.controlnet.eval()
                m.validate()
                validation_peak, validation_groups = mem.peak, dict(mem.peak_groups)
                del opt
        finally:
            TRACKERS.remove(mem)
        trainable = [p for p in m.controlnet.parameters() if p.requires_grad]
        return Measured(
            step_peak=step_peak,
            step_groups={k: v for k, v in step_groups.items() if v},
            validation_peak=validation_peak,
            validation_groups={k: v for k, v in validation_groups.items() if v},
            validation_start=validation_start,
            validation_weights=sum(loaded.values()),
            attention_workspace=mem.attention_workspace,
            weights=weights,
            trainable_params=sum(p.numel() for p in trainable),
            param_shapes=[tuple(p.shape) for p in trainable],
            frozen_names=tuple(m.frozen),
            frozen_block_bytes=max((local_bytes(b) for model in m.frozen.values() for b in frozen_blocks(model)), default=0),
        )


def spec_dict(spec: StepSpec) -> dict:
    return asdict(spec)
