"""train stage: a ControlNet initialised from the base UNet, base frozen, trained through accelerate
with the tier's memory settings on the latent cache. Saved in diffusers format
(``ControlNetModel.from_pretrained``).

Checkpoints every ``checkpointing_steps`` (the newest ``checkpoints_total_limit`` kept) hold the
model, optimizer, LR scheduler, RNG states and the position in the data; each micro-batch draws its
noise from a generator seeded by its position, so a resumed run continues exactly where the
interrupted one was. Validation images and their condition fidelity are logged every
``validation.steps``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from diffusers import ControlNetModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..config import Config, accumulation_steps, resolve_tier
from ..diffusion import diffusion_loss, drop_captions, noisy_inputs, sample_latents
from ..models.base_model import BaseRef, load_base
from ..storage import (
    CAPTIONS_DIR,
    CONTROLNET_DIR,
    EVALUATOR_DIR,
    TRAIN_DIR,
    fresh_dir,
    load_dataset_dir,
    seed_everything,
    write_json,
)
from ..training.batches import CachedPairs, ResumableBatches, batch_stream, step_generator
from ..training.checkpoints import clean_partial, find_resume, read_state, save_checkpoint
from ..training.launch import relaunch
from ..training.memory import apply_model_settings, deepspeed_plugin, make_optimizer
from ..training.tracking import Trackers
from ..training.validation import load_segmenter, run_validation, validation_pairs
from .cache import LatentCache, current_fingerprint

DEFAULT_HINT_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNet hint encoder: 3 downsamplings (8x)
CHECKPOINTS = TRAIN_DIR / "checkpoints"
# Settings that do not change what a run computes: a checkpoint stays resumable across them.
NOT_IN_RUN_FINGERPRINT = {
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume_from_checkpoint",
    "validation",
    "report_to",
    "tracker_project_name",
    "push_to_hub",
    "hub_model_id",
    "dataloader_num_workers",
}


def controlnet_from_unet(unet, vae_config) -> ControlNetModel:
    """Copy the UNet's encoder; the hint encoder downsamples as much as the VAE does."""
    downs = len(vae_config["block_out_channels"]) - 1
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=DEFAULT_HINT_CHANNELS[: downs + 1])


def controlnet_loss(controlnet, unet, scheduler, batch: dict, empty, scale: float, p_empty: float, g, device, dtype):
    """Upstream's objective: noise the (sampled) latents, run ControlNet + frozen UNet, MSE."""
    x0 = sample_latents(batch["latent_mean"], batch["latent_std"], scale, g).to(device)
    noisy, ts, target = noisy_inputs(scheduler, x0, g)
    enc = drop_captions(batch["text_embedding"], empty, p_empty, g).to(device)
    hint = batch["conditioning"].to(device)
    down, mid = controlnet(noisy, ts, encoder_hidden_states=enc, controlnet_cond=hint, return_dict=False)
    pred = unet(
        noisy.to(dtype),
        ts,
        encoder_hidden_states=enc.to(dtype),
        down_block_additional_residuals=[d.to(dtype) for d in down],
        mid_block_additional_residual=mid.to(dtype),
    ).sample
    return diffusion_loss(pred, target)


def run_fingerprint(cfg: Config, cache_fingerprint: str) -> str:
    kept = {k: v for k, v in cfg.recipe.train.model_dump().items() if k not in NOT_IN_RUN_FINGERPRINT}
    return hashlib.sha256(json.dumps([kept, cache_fingerprint], sort_keys=True).encode()).hexdigest()[:16]


def train_controlnet(cfg: Config) -> dict:
    r, t = cfg.recipe, cfg.recipe.train
    tier_name = resolve_tier(cfg.gpu)
    tier = cfg.tiers[tier_name]
    cpu = not torch.cuda.is_available()
    world = PartialState(cpu=cpu).num_processes
    micro, accum = accumulation_steps(t.batch_size, tier.batch_size, world)
    accelerator = Accelerator(
        mixed_precision=tier.mixed_precision,
        gradient_accumulation_steps=accum,
        deepspeed_plugin=deepspeed_plugin(tier, accum, micro, t.max_grad_norm),
        cpu=cpu,
    )
    rank, main = accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tier.mixed_precision, torch.float32)
    if t.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(t.seed)

    cache = LatentCache.load(current_fingerprint(cfg))
    dataset = load_dataset_dir(CAPTIONS_DIR)
    data = CachedPairs(
        cache.rows, dataset["train"], r.columns.conditioning_image, r.data.resolution, t.seed if t.shuffle_conditions else None
    )
    if t.shuffle_conditions:
        print("train: shuffle_conditions is on: every image is paired with another sample's condition (a planted failure)")
    micro_per_epoch = len(data) // (micro * world)
    max_steps = t.max_train_steps or t.num_train_epochs * max(1, micro_per_epoch // accum)

    base = load_base(BaseRef.read())  # the VAE and text encoder stay on the CPU (validation only)
    for m in (base.vae, base.text_encoder, base.unet):
        m.requires_grad_(False).eval()
    controlnet = controlnet_from_unet(base.unet, base.vae.config)
    base.unet.to(device, dtype=weight_dtype)
    apply_model_settings(base.unet, controlnet, tier)
    controlnet.train()

    lr = t.learning_rate * (t.batch_size if t.scale_lr else 1)
    optimizer = make_optimizer(controlnet.parameters(), tier, t, lr)
    lr_scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=t.lr_warmup_steps * world,
        num_training_steps=max_steps * world,
        num_cycles=t.lr_num_cycles,
        power=t.lr_power,
    )
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)

    run_fp = run_fingerprint(cfg, cache.fingerprint)
    if main:
        for name in clean_partial(CHECKPOINTS):
            print(f"train: removed {name}, left by an interrupted save")
    resume, why = find_resume(CHECKPOINTS, t.resume_from_checkpoint, run_fp)
    accelerator.print(f"train: {why}")
    start = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        start = read_state(resume)["step"]
    elif main:
        fresh_dir(TRAIN_DIR)
    accelerator.wait_for_everyone()

    sampler = ResumableBatches(len(data), micro, t.seed, start=start * accum, rank=rank, world=world)
    stream = batch_stream(data, sampler, t.dataloader_num_workers)
    pairs = validation_pairs(
        t.validation, dataset["validation"], r.columns.conditioning_image, r.columns.caption, r.data.resolution
    )
    segmenter = load_segmenter(EVALUATOR_DIR)
    run_config = {"recipe": cfg.recipe_name, "tier": tier_name, **tier.model_dump(), **t.model_dump(exclude={"validation"})}
    trackers = Trackers(t.report_to, TRAIN_DIR, t.tracker_project_name, run_config, resume=start > 0) if main else None
    empty, scale = cache.empty_prompt, cache.scaling_factor

    def validate(step: int) -> dict[str, float]:
        grid, metrics = run_validation(
            base, accelerator.unwrap_model(controlnet), pairs, t.validation, r.data.resolution, t.seed, segmenter
        )
        grid.save(TRAIN_DIR / "validation.png")
        trackers.log_image("validation", grid, step)
        trackers.log(metrics, step)
        return metrics

    losses: list[float] = []
    last_val: dict[str, float] = {}
    t0, steps_run = time.time(), 0
    bar = tqdm(range(start, max_steps), initial=start, total=max_steps, desc="train: ControlNet", disable=not main)
    for step in bar:
        step_loss = 0.0
        for m in range(accum):
            batch = next(stream)
            g = step_generator(t.seed, step, m, rank)
            with accelerator.accumulate(controlnet):
                loss = controlnet_loss(
                    controlnet,
                    base.unet,
                    base.noise_scheduler,
                    batch,
                    empty,
                    scale,
                    t.proportion_empty_prompts,
                    g,
                    device,
                    weight_dtype,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(controlnet.parameters(), t.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=tier.set_grads_to_none)
            step_loss += loss.item() / accum
        done, steps_run = step + 1, steps_run + 1
        losses.append(step_loss)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if main and (done % 10 == 0 or done == max_steps):
            trackers.log({"loss": float(np.mean(losses[-10:])), "lr": lr_scheduler.get_last_lr()[0]}, done)
        if done % t.checkpointing_steps == 0 or done == max_steps:
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(
                    CHECKPOINTS,
                    done,
                    accelerator.save_state,
                    {"fingerprint": run_fp, "micro_batches_read": done * accum, "tier": tier_name},
                    t.checkpoints_total_limit,
                )
            accelerator.wait_for_everyone()
        if main and (done % t.validation.steps == 0 or done == max_steps):
            last_val = validate(done)
    seconds = time.time() - t0
    if main and not last_val:  # resumed at the last step: the final validation still belongs to the outputs
        last_val = validate(max_steps)
    accelerator.wait_for_everyone()
    if main:
        trackers.close()
        out = fresh_dir(CONTROLNET_DIR)
        accelerator.unwrap_model(controlnet).save_pretrained(out)
    return {
        "tier": tier_name,
        "micro_batch": micro,
        "gradient_accumulation_steps": accum,
        "processes": world,
        "effective_batch": micro * accum * world,
        "steps": max_steps,
        "resumed_from_step": start,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        **last_val,
        "train_seconds": round(seconds, 1),
        "steps_per_second": round(steps_run / seconds, 3) if steps_run else None,
    }


def main(cfg: Config) -> None:
    if relaunch(cfg.tier, sys.argv[1:]):  # several GPUs or machines, or DeepSpeed: under accelerate launch
        return
    summary = train_controlnet(cfg)
    if PartialState().is_main_process:
        write_json(CONTROLNET_DIR / "training.json", summary)
        write_json(TRAIN_DIR / "metrics.json", summary)
        print(f"train: {summary} -> {CONTROLNET_DIR}")
