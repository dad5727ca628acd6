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
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from diffusers import ControlNetModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import Config, ConfigError, Tier, accumulation_steps, check_tier, resolve_tier
from ..models.base_model import BASE_FILE, BaseRef, load_base
from ..models.families import family
from ..storage import (
    BASE_DIR,
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
from ..training.checkpoints import (
    EMA_WEIGHTS,
    WEIGHTS,
    clean_partial,
    consolidate_zero,
    find_resume,
    read_state,
    run_dir,
    save_checkpoint,
)
from ..training.latent_cache import LatentCache, current_fingerprint
from ..training.launch import launched, relaunch
from ..training.memory import (
    apply_model_settings,
    deepspeed_plugin,
    direct_attention_calls,
    make_optimizer,
    param_groups,
)
from ..training.step import controlnet_from_unet, controlnet_loss, objective
from ..training.tracking import Trackers
from ..training.validation import load_extractor, run_validation, validation_pairs

CHECKPOINTS = TRAIN_DIR / "checkpoints"
# Settings that leave the steps already taken alone: a run resumes across them.
NOT_IN_RUN = {
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume_from_checkpoint",
    "validation",
    "report_to",
    "tracker_project_name",
    "dataloader_num_workers",
    "max_train_steps",  # the length: in the run only where the schedule depends on it (below)
    "num_train_epochs",
}
# Learning-rate schedules that do not depend on the run's length: a longer run extends a shorter one.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def run_settings(cfg: Config, tier: Tier, cache_fingerprint: str, micro: int, accum: int, world: int, max_steps: int) -> dict:
    """What the steps a checkpoint holds depend on: the data (the cache), the training settings
    and levers, the optimizer's kind, DeepSpeed, precision and the batch's split (the noise is
    drawn per micro-batch), and the length where the schedule depends on it."""
    t = cfg.recipe.train
    settings = {k: v for k, v in t.model_dump().items() if k not in NOT_IN_RUN}
    settings.update(
        cache=cache_fingerprint,
        optimizer="AdamW8bit" if tier.use_8bit_adam else "AdamW",
        deepspeed=tier.deepspeed,
        mixed_precision=tier.mixed_precision,
        micro_batch=micro,
        accumulation=accum,
        processes=world,
    )
    if t.lr_scheduler not in LENGTH_FREE_SCHEDULES:
        settings["max_steps"] = max_steps
    return settings


def run_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


LEVERS = (  # the convergence levers (README: Time to control), recorded in training.json
    "timestep_sampling",
    "logit_mean",
    "logit_std",
    "loss_weighting",
    "snr_gamma",
    "ema_decay",
    "new_layers_lr_multiplier",
    "hint_init",
    "proportion_empty_prompts",
    "condition_loss_weight",
)


@contextmanager
def with_weights(model: ControlNetModel, ema: EMAModel | None) -> Iterator[ControlNetModel]:
    """``model`` with the weights to validate, sweep or export: its own, or the EMA's swapped in
    for the duration (EMAModel's store/copy_to/restore: no second copy of the model)."""
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())


def consolidated(model: ControlNetModel, checkpoint: Path) -> ControlNetModel:
    """A fresh ``model`` holding the checkpoint's consolidated (fp32) weights."""
    fresh = ControlNetModel.from_config(model.config)
    fresh.load_state_dict(load_file(checkpoint / WEIGHTS))
    return fresh


def tier_for(cfg: Config, ref: BaseRef) -> tuple[str, Tier]:
    """The tier, checked against the base's family (with ``family: auto``, known only once the base
    stage has read the model's index) before any model loads. ``gpu: auto`` on a GPU: the planner's
    fit for this run and the card's free memory (planning/fit.py), said with its reasons."""
    check_tier(cfg.gpu, ref.family, f"{BASE_DIR / BASE_FILE} (family {ref.family})")
    if cfg.gpu == "auto" and torch.cuda.is_available():
        from ..planning.fit import detect_and_fit
        from ..planning.plan import architecture

        try:
            arch = architecture(ref.name_or_path)
        except ConfigError as e:
            name = resolve_tier(cfg.gpu, ref.family)
            print(f"train: gpu: auto: {e}; tier {name} from the card's size")
            return name, cfg.tiers[name]
        tier, why = detect_and_fit(cfg.recipe, arch)
        print(f"train: gpu: auto: {why}")
        return "auto", tier
    name = resolve_tier(cfg.gpu, ref.family)
    return name, cfg.tiers[name]


Probe = Callable[[int, ControlNetModel], None]  # (step, the weights validation would use)


def train_controlnet(
    cfg: Config,
    *,
    train_dir: Path = TRAIN_DIR,
    out_dir: Path = CONTROLNET_DIR,
    probe: Probe | None = None,
    probe_every: int = 0,
) -> dict:
    """Train, checkpoint, validate and save the ControlNet. ``probe`` (the convergence benchmark's)
    is called before the first step and every ``probe_every`` steps with the weights that
    validation would use."""
    r, t = cfg.recipe, cfg.recipe.train
    checkpoints = train_dir / "checkpoints"
    ref = BaseRef.read()
    tier_name, tier = tier_for(cfg, ref)
    cpu, zero = not torch.cuda.is_available(), tier.deepspeed is not None
    # Without a GPU accelerate gives DeepSpeed's ranks no process group of their own: gloo joins them.
    world = (PartialState(backend="gloo") if cpu and zero and launched() else PartialState(cpu=cpu)).num_processes
    micro, accum = accumulation_steps(t.batch_size, tier.batch_size, world)
    accelerator = Accelerator(
        mixed_precision=tier.mixed_precision,
        gradient_accumulation_steps=accum,
        deepspeed_plugin=deepspeed_plugin(tier, accum, micro, t.max_grad_norm),
        cpu=cpu and not zero,
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

    base, fam = load_base(ref), family(ref.family)  # the VAE and text encoders stay on the CPU (validation only)
    for m in (base.vae, *base.text_encoders, base.unet):
        m.requires_grad_(False).eval()
    controlnet = controlnet_from_unet(base.unet, base.vae.config, t.hint_init)
    base.unet.to(device, dtype=weight_dtype)
    apply_model_settings(base.unet, controlnet, tier)
    direct_attention_calls(base.unet, controlnet)  # the same computation, less Python per step
    controlnet.train()

    lr = t.learning_rate * (t.batch_size if t.scale_lr else 1)
    optimizer = make_optimizer(param_groups(controlnet, lr, t.new_layers_lr_multiplier), tier, t, lr)
    lr_scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=t.lr_warmup_steps * world,
        num_training_steps=max_steps * world,
        num_cycles=t.lr_num_cycles,
        power=t.lr_power,
    )
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    ema = None
    if t.ema_decay is not None:  # diffusers' EMA (with its warm-up: decay min(d, (1+n)/(10+n)))
        ema = EMAModel(accelerator.unwrap_model(controlnet).parameters(), decay=t.ema_decay, foreach=True)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)  # saved and restored with the run's state
    obj = objective(t)

    settings = run_settings(cfg, tier, cache.fingerprint, micro, accum, world, max_steps)
    key = run_key(settings)
    run_checkpoints = run_dir(checkpoints, key)
    if main:
        for name in clean_partial(run_checkpoints):
            print(f"train: removed {name}, left by an interrupted save")
    resume, why = find_resume(checkpoints, t.resume_from_checkpoint, key, settings)
    accelerator.print(f"train: {why}")
    start = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        start = read_state(resume)["step"]
    elif main:  # a fresh start: this run's logs and checkpoints go; other runs' checkpoints stay
        for p in train_dir.iterdir() if train_dir.is_dir() else []:
            if p.name != checkpoints.name:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        shutil.rmtree(run_checkpoints, ignore_errors=True)
        train_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    sampler = ResumableBatches(len(data), micro, t.seed, start=start * accum, rank=rank, world=world)
    stream = batch_stream(data, sampler, t.dataloader_num_workers)
    pairs = validation_pairs(
        t.validation, dataset["validation"], r.columns.conditioning_image, r.columns.caption, r.data.resolution
    )
    extractor = load_extractor(EVALUATOR_DIR)
    run_config = {"recipe": cfg.recipe_name, "tier": tier_name, **tier.model_dump(), **t.model_dump(exclude={"validation"})}
    trackers = Trackers(t.report_to, train_dir, t.tracker_project_name, run_config, resume=start > 0) if main else None
    empty, scale = cache.empty_prompt, cache.scaling_factor

    def write_state(folder: Path) -> None:
        accelerator.save_state(str(folder))  # every process: its RNG state, and under DeepSpeed its shards
        if not main:
            return
        if zero:  # the sweep's weights, in fp32
            consolidate_zero(folder)
        if ema is not None:  # the sweep's weights, keyed like the model's
            with with_weights(accelerator.unwrap_model(controlnet), ema) as model:
                save_file(model.state_dict(), str(Path(folder) / EMA_WEIGHTS))

    def validate(step: int) -> dict[str, float]:
        with with_weights(accelerator.unwrap_model(controlnet), ema) as model:
            grid, metrics = run_validation(base, model, pairs, t.validation, r.data.resolution, t.seed, extractor)
        grid.save(train_dir / "validation.png")
        trackers.log_image("validation", grid, step)
        trackers.log(metrics, step)
        return metrics

    losses: list[float] = []
    pending: list[torch.Tensor] = []
    last_val: dict[str, float] = {}
    t0, steps_run = time.time(), 0
    if probe is not None:
        with with_weights(accelerator.unwrap_model(controlnet), ema) as model:
            probe(start, model)
    bar = tqdm(range(start, max_steps), initial=start, total=max_steps, desc="train: ControlNet", disable=not main)
    for step in bar:
        step_loss = torch.zeros((), device=device)  # summed on the device: no host sync per micro-step
        for m in range(accum):
            batch = next(stream)
            with accelerator.accumulate(controlnet):
                loss = controlnet_loss(
                    controlnet=controlnet,
                    unet=base.unet,
                    scheduler=base.noise_scheduler,
                    batch=batch,
                    empty_prompt=empty,
                    scaling_factor=scale,
                    p_empty=t.proportion_empty_prompts,
                    generator=step_generator(t.seed, step, m, rank),
                    device=device,
                    dtype=weight_dtype,
                    objective=obj,
                    family=fam,
                    channels_last=tier.channels_last,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(controlnet.parameters(), t.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=tier.set_grads_to_none)
            step_loss += loss.detach() / accum
        if ema is not None:
            ema.step(accelerator.unwrap_model(controlnet).parameters())
        pending.append(step_loss)
        done, steps_run = step + 1, steps_run + 1
        if done % 10 == 0 or done == max_steps:  # one host sync per 10 steps
            losses += torch.stack(pending).tolist()
            pending.clear()
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if main and (done % 10 == 0 or done == max_steps):
            trackers.log({"loss": float(np.mean(losses[-10:])), "lr": lr_scheduler.get_last_lr()[0]}, done)
        if done % t.checkpointing_steps == 0 or done == max_steps:
            save_checkpoint(
                run_checkpoints,
                done,
                write_state,
                {"run": key, "settings": settings, "micro_batches_read": done * accum, "tier": tier_name},
                t.checkpoints_total_limit,
                main=main,
                barrier=accelerator.wait_for_everyone,
            )
        if main and (done % t.validation.steps == 0 or done == max_steps):
            last_val = validate(done)
        if probe is not None and probe_every and done % probe_every == 0:
            with with_weights(accelerator.unwrap_model(controlnet), ema) as model:
                probe(done, model)
    seconds = time.time() - t0
    if main and not last_val:  # resumed at the last step: the final validation still belongs to the outputs
        last_val = validate(max_steps)
    accelerator.wait_for_everyone()
    if main:
        trackers.close()
        out = fresh_dir(out_dir)
        with with_weights(accelerator.unwrap_model(controlnet), ema) as model:
            if zero and ema is None:  # DeepSpeed's fp32 master weights, not the engine's half-precision copy
                model = consolidated(model, run_checkpoints / f"checkpoint-{max_steps}")
            model.save_pretrained(out)
    return {
        "tier": tier_name,
        "micro_batch": micro,
        "gradient_accumulation_steps": accum,
        "processes": world,
        "effective_batch": micro * accum * world,
        "steps": max_steps,
        "resumed_from_step": start,
        "checkpoints": run_checkpoints.as_posix(),  # this run's: the evaluate stage sweeps them
        "levers": {k: getattr(t, k) for k in LEVERS},
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        **last_val,
        "train_seconds": round(seconds, 1),
        "steps_per_second": round(steps_run / seconds, 3) if steps_run else None,
    }


def main(cfg: Config) -> None:
    _, tier = tier_for(cfg, BaseRef.read())
    if relaunch(tier, sys.argv[1:]):  # several GPUs or machines, or DeepSpeed: under accelerate launch
        return
    summary = train_controlnet(cfg)
    if PartialState().is_main_process:
        write_json(CONTROLNET_DIR / "training.json", summary)
        write_json(TRAIN_DIR / "metrics.json", summary)
        print(f"train: {summary} -> {CONTROLNET_DIR}")
