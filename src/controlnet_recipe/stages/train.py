"""train stage: a ControlNet initialised from the base UNet, base frozen, trained through accelerate
with the tier's memory settings. Saved in diffusers format (``ControlNetModel.from_pretrained``).

Latents and text embeddings are encoded once before the loop (upstream encodes them every step);
each step samples from the cached posterior, which is what per-step encoding computes.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import ControlNetModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..config import Config, Tier, accumulation_steps, resolve_tier
from ..diffusion import caption_embeddings, diffusion_loss, drop_captions, encode_images, noisy_inputs, sample_latents
from ..models.base_model import BaseRef, load_base
from ..storage import (
    CAPTIONS_DIR,
    CONTROLNET_DIR,
    TRAIN_LOG_DIR,
    fresh_dir,
    images_to_tensor,
    load_dataset_dir,
    seed_everything,
    write_json,
)

DEFAULT_HINT_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNet hint encoder: 3 downsamplings (8x)


def controlnet_from_unet(unet, vae) -> ControlNetModel:
    """Copy the UNet's encoder; the hint encoder downsamples as much as the VAE does."""
    downs = len(vae.config.block_out_channels) - 1
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=DEFAULT_HINT_CHANNELS[: downs + 1])


def make_optimizer(params, tier: Tier, t) -> torch.optim.Optimizer:
    kw = {
        "lr": t.learning_rate,
        "betas": (t.adam_beta1, t.adam_beta2),
        "weight_decay": t.adam_weight_decay,
        "eps": t.adam_epsilon,
    }
    if tier.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def epoch_batches(n: int, micro: int, seed: int):
    """Endless deterministic stream of index batches: a fresh permutation every epoch."""
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i in range(0, n - micro + 1, micro):
            yield perm[i : i + micro]
        epoch += 1


def train_controlnet(cfg: Config) -> dict:
    r, t = cfg.recipe, cfg.recipe.train
    tier_name = resolve_tier(cfg.gpu)
    tier = cfg.tiers[tier_name]
    accelerator = Accelerator(mixed_precision=tier.mixed_precision, cpu=not torch.cuda.is_available())
    micro, accum = accumulation_steps(t.batch_size, tier.batch_size, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = accum
    seed_everything(t.seed)
    g = torch.Generator().manual_seed(t.seed)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tier.mixed_precision, torch.float32)

    base = load_base(BaseRef.read())
    for m in (base.vae, base.text_encoder, base.unet):
        m.requires_grad_(False).eval()
    controlnet = controlnet_from_unet(base.unet, base.vae)
    if tier.attention == "xformers":
        base.unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    if tier.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        base.unet.enable_gradient_checkpointing()
    controlnet.train()

    ds = load_dataset_dir(CAPTIONS_DIR)["train"]
    base.vae.to(device)
    mean, std = encode_images(base.vae, images_to_tensor(ds[r.columns.image], r.data.resolution))
    scale = base.vae.config.scaling_factor
    base.vae.to("cpu")
    captions = list(ds[r.columns.caption])
    base.text_encoder.to(device)
    text, empty = caption_embeddings(base.tokenizer, base.text_encoder, captions)
    base.text_encoder.to("cpu")
    cond = images_to_tensor(ds[r.columns.conditioning_image], r.data.resolution, normalize=False)

    base.unet.to(device, dtype=weight_dtype)
    optimizer = make_optimizer(controlnet.parameters(), tier, t)
    lr_scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=t.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=t.max_train_steps * accelerator.num_processes,
    )
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)

    from dvclive import Live

    log_dir = fresh_dir(TRAIN_LOG_DIR)
    live = Live(dir=str(log_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    batches = epoch_batches(len(mean), micro, t.seed)
    losses: list[float] = []
    t0 = time.time()
    for step in (bar := tqdm(range(t.max_train_steps), desc="train: ControlNet", disable=not accelerator.is_main_process)):
        step_loss = 0.0
        for _ in range(accum):
            idx = next(batches)
            with accelerator.accumulate(controlnet):
                x0 = sample_latents(mean[idx], std[idx], scale, g).to(device)
                noisy, ts, target = noisy_inputs(base.noise_scheduler, x0, g)
                enc = drop_captions(text[idx], empty, t.proportion_empty_prompts, g).to(device)
                hint = cond[idx].to(device)
                down, mid = controlnet(noisy, ts, encoder_hidden_states=enc, controlnet_cond=hint, return_dict=False)
                pred = base.unet(
                    noisy.to(weight_dtype),
                    ts,
                    encoder_hidden_states=enc.to(weight_dtype),
                    down_block_additional_residuals=[d.to(weight_dtype) for d in down],
                    mid_block_additional_residual=mid.to(weight_dtype),
                ).sample
                loss = diffusion_loss(pred, target)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(controlnet.parameters(), t.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=tier.set_grads_to_none)
            step_loss += loss.item() / accum
        losses.append(step_loss)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % 10 == 0 or step + 1 == t.max_train_steps:
            live.step = step + 1
            live.log_metric("loss", float(np.mean(losses[-10:])))
            live.log_metric("lr", lr_scheduler.get_last_lr()[0])
    live.end()
    seconds = time.time() - t0
    accelerator.wait_for_everyone()
    out = fresh_dir(CONTROLNET_DIR)
    if accelerator.is_main_process:
        accelerator.unwrap_model(controlnet).save_pretrained(out)
    return {
        "tier": tier_name,
        "micro_batch": micro,
        "gradient_accumulation_steps": accum,
        "effective_batch": micro * accum * accelerator.num_processes,
        "steps": t.max_train_steps,
        "final_loss": float(np.mean(losses[-50:])),
        "train_seconds": round(seconds, 1),
        "steps_per_second": round(t.max_train_steps / seconds, 3),
    }


def main(cfg: Config) -> None:
    summary = train_controlnet(cfg)
    write_json(CONTROLNET_DIR / "training.json", summary)
    print(f"train: {summary} -> {CONTROLNET_DIR}")
