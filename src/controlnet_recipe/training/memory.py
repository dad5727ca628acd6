"""A memory tier's switches applied to the models and the optimizer.

What keeps a tier under its budget: the latent cache (no VAE or text encoder on the GPU while
training), the frozen denoiser in fp16/bf16 (a transformer's in fp8 with ``frozen_fp8``), gradient
checkpointing of both the ControlNet and the frozen denoiser (upstream checkpoints the ControlNet
only), 8-bit AdamW, and set_grads_to_none.
DeepSpeed ZeRO-2 with the optimizer offloaded to CPU is the alternative for the smallest cards.
On several GPUs, ``shard_frozen`` splits the frozen base across them (FSDP2): each holds 1/N of it.
"""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import torch

from ..core.config import ConfigError, Tier, TrainCfg

DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"  # package data


NEW_LAYERS = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")  # SD's hint encoder, zero convs


def param_groups(model: torch.nn.Module, lr: float, multiplier: float, new_layers: tuple[str, ...] = NEW_LAYERS) -> list[dict]:
    """The ControlNet's parameters in two groups: the layers it adds to the base's (``new_layers``,
    the family's: the hint encoder and the zero convolutions) at ``lr x multiplier``, the copied
    ones at ``lr``."""
    new, copied = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (new if name.startswith(new_layers) else copied).append(p)
    if multiplier == 1.0:
        return [{"params": copied + new, "lr": lr}]  # one group, as upstream
    return [{"params": copied, "lr": lr}, {"params": new, "lr": lr * multiplier}]


def make_optimizer(groups: list[dict], tier: Tier, t: TrainCfg, lr: float, *, fused: bool | None = True) -> torch.optim.Optimizer:
    """AdamW (8-bit where the tier says), fused: one kernel for every parameter, on CUDA and on CPU
    (on the tiny ControlNet an optimizer step takes 1.4 ms instead of 5.4 ms on two cores).
    ``fused=None`` is upstream's AdamW as it comes (a loop over the parameters on CPU)."""
    kw = {"lr": lr, "betas": (t.adam_beta1, t.adam_beta2), "weight_decay": t.adam_weight_decay, "eps": t.adam_epsilon}
    if tier.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw, fused=fused)


def master_weights(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """The trained module's parameters in fp32 (a kind that trains inside the frozen model, as
    Control-LoRA, had them cast with it), its frozen ones (a copy of the base's: ControlNet-LoRA's,
    ControlNet-XS's) in the run's ``dtype``."""
    for p in module.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
        elif not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def apply_model_settings(unet, controlnet, tier: Tier, dtype: torch.dtype | None = None) -> None:
    """Attention backend, gradient checkpointing, memory format and compilation, on the ControlNet
    and the frozen denoiser (``unet``: a UNet or a transformer); with ``frozen_fp8``, the frozen
    denoiser's weights stored in fp8 and cast to ``dtype`` layer by layer as it runs."""
    if tier.frozen_fp8:
        unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype or torch.bfloat16)
    if tier.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError("tiers: attention: xformers is not installed (pip install xformers, or attention: sdpa)")
        unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    # sdpa: diffusers' default attention processor on torch 2 (torch.nn.functional.scaled_dot_product_attention).
    if tier.gradient_checkpointing:
        if getattr(controlnet, "_supports_gradient_checkpointing", False):  # a T2I-Adapter has none (few activations)
            controlnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()
    if tier.channels_last:
        unet.to(memory_format=torch.channels_last)
        controlnet.to(memory_format=torch.channels_last)
    if tier.compile:  # in place: state-dict keys (and so checkpoints) stay those of the plain module
        unet.compile()
        controlnet.compile()


def _call_processor(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
    """Attention.forward without its per-call ``inspect.signature`` of the processor (the filter
    for cross-attention kwargs): with none given, the processor is called as Attention would."""
    if kwargs:
        return type(self).forward(self, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
    return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask)


def direct_attention_calls(*models: torch.nn.Module) -> int:
    """diffusers' ``Attention.forward`` inspects its processor's signature on every call, to filter
    cross-attention kwargs that training never passes; on the tiny models Python overhead is much of
    a step. Each Attention of ``models`` calls its processor directly instead (the same
    computation). Returns how many were changed."""
    from diffusers.models.attention_processor import Attention

    n = 0
    for model in models:
        for m in model.modules():
            if isinstance(m, Attention):
                m.forward = types.MethodType(_call_processor, m)
                n += 1
    return n


def deepspeed_plugin(tier: Tier, accumulation: int, micro_batch: int, max_grad_norm: float):
    """accelerate's DeepSpeed plugin for ``tier.deepspeed`` (None when the tier has none)."""
    if not tier.deepspeed:
        return None
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("tiers: deepspeed: the deepspeed package is not installed (pip install deepspeed, GPU only)")
    from accelerate import DeepSpeedPlugin

    cfg = json.loads((DEEPSPEED_CONFIGS / f"{tier.deepspeed}.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["gradient_clipping"] = max_grad_norm
    return DeepSpeedPlugin(hf_ds_config=cfg)


def shard_frozen(denoiser: torch.nn.Module, device: torch.device, world: int) -> int:
    """Shard the frozen ``denoiser`` across the ``world`` processes with FSDP2 (torch's
    ``fully_shard``, what accelerate's FSDP plugin applies), each of its blocks (the model's
    ``_no_split_modules``: FLUX's double- and single-stream blocks, SD3's joint blocks) a unit of
    its own, so that a forward gathers one block at a time. Its weights move to ``device`` as 1/N
    shards. Returns how many blocks were sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    blocks = frozen_blocks(denoiser)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(denoiser, mesh=mesh)  # the rest: embedders, norms, the output projection
    return len(blocks)


def frozen_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model``'s blocks, as diffusers names their kinds (``_no_split_modules``): FSDP's units."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in kinds]


def local_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters this process holds (its shards, where sharded)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())  # fake ones too
