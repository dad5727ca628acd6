"""A memory tier's switches applied to the models and the optimizer.

What keeps a tier under its budget: the latent cache (no VAE or text encoder on the GPU while
training), the frozen UNet in fp16/bf16, gradient checkpointing of both the ControlNet and the
frozen UNet (upstream checkpoints the ControlNet only), 8-bit AdamW, and set_grads_to_none.
DeepSpeed ZeRO-2 with the optimizer offloaded to CPU is the alternative for the smallest cards.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from ..config import ConfigError, Tier, TrainCfg

DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"  # package data


def make_optimizer(params, tier: Tier, t: TrainCfg, lr: float) -> torch.optim.Optimizer:
    kw = {"lr": lr, "betas": (t.adam_beta1, t.adam_beta2), "weight_decay": t.adam_weight_decay, "eps": t.adam_epsilon}
    if tier.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def apply_model_settings(unet, controlnet, tier: Tier) -> None:
    """Attention backend and gradient checkpointing, on the ControlNet and the frozen UNet."""
    if tier.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError("tiers: attention: xformers is not installed (pip install xformers, or attention: sdpa)")
        unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    # sdpa: diffusers' default attention processor on torch 2 (torch.nn.functional.scaled_dot_product_attention).
    if tier.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()


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
