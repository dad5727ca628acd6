"""The ControlNet trainer: a ControlNet initialised from the base's denoiser (a UNet or a
transformer, as its family builds it), the base frozen, trained through accelerate with the tier's
memory settings on the latent cache.

:class:`Trainer` owns the loop; its components own their schedules: the :class:`Checkpointer`
decides when to save and what to resume from, the :class:`Validator` when to validate, the
trackers what is logged. Each micro-batch draws its noise from a generator seeded by its position,
so a resumed run continues exactly where the interrupted one was. :meth:`Trainer.run` takes an
``until`` step, so a benchmark can look at the weights between runs without a hook in the loop.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from ..adapters import ADAPTER_FILE
from ..adapters import check as check_adapter
from ..core.config import Config, ConfigError, Tier, accumulation_steps
from ..core.logs import progress
from ..core.storage import CAPTIONS_DIR, EVALUATOR_DIR, TRAIN_DIR, fresh_dir, load_dataset_dir, seed_everything, write_json
from ..models.base_model import BaseRef, load_base
from ..models.families import family, recipe_buckets
from .batches import CachedPairs, batch_stream, batches_for, step_generator, training_pairs
from .checkpoints import EMA_WEIGHTS, WEIGHTS, Checkpointer, consolidate_zero, read_state
from .latent_cache import LatentCache, current_fingerprint
from .launch import launched
from .memory import (
    apply_model_settings,
    deepspeed_plugin,
    direct_attention_calls,
    local_bytes,
    make_optimizer,
    master_weights,
    param_groups,
    shard_frozen,
)
from .quantize import quantize_frozen, tier_with
from .step import LossInputs, controlnet_loss, objective
from .tracking import Trackers
from .validation import Validator, load_extractor, validation_pairs

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
LEVERS = (  # the convergence levers (docs/benchmarks.md: Time to control), recorded in training.json
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
    "mode_scale",
    "flow_shift",
)


def run_settings(cfg: Config, tier: Tier, cache_fingerprint: str, micro: int, accum: int, world: int, max_steps: int) -> dict:
    """What the steps a checkpoint holds depend on: the data (the cache), the training settings
    and levers, the optimizer's kind, DeepSpeed, precision and the batch's split (the noise is
    drawn per micro-batch), and the length where the schedule depends on it."""
    t = cfg.recipe.train
    settings = {k: v for k, v in t.model_dump().items() if k not in NOT_IN_RUN}
    settings.update(
        adapter=cfg.recipe.adapter.model_dump(),
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


@contextmanager
def with_weights(model: torch.nn.Module, ema: EMAModel | None) -> Iterator[torch.nn.Module]:
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


def consolidated(model: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    """A fresh ``model`` holding the checkpoint's consolidated (fp32) weights."""
    fresh = type(model).from_config(model.config)
    fresh.load_state_dict(load_file(checkpoint / WEIGHTS))
    return fresh


class Trainer:
    """Everything set up for one run under ``tier`` (named ``tier_name`` in the logs), resumed
    where the checkpointer says; :meth:`run` trains, :meth:`finish` exports and summarises."""

    def __init__(self, cfg: Config, tier_name: str, tier: Tier, train_dir: Path = TRAIN_DIR):
        self.cfg, self.t, self.tier, self.tier_name, self.train_dir = cfg, cfg.recipe.train, tier, tier_name, train_dir
        ref = BaseRef.read()
        self.family = family(ref.family)
        self.adapter = check_adapter(cfg.recipe.adapter, ref.family)  # the kind of control trained
        # The parts, each built by its own method, in the order their random draws and files need.
        self._build_processes()
        cache, dataset, data = self._build_data()
        base, controlnet = self._build_models(ref)
        self._build_optimization(controlnet)
        self.loss_inputs = self._loss_inputs(base, cache)
        self._build_checkpointer(cache.fingerprint)
        self._build_reporting(data, dataset, base)
        self.frozen_gib = local_bytes(base.denoiser) / 1024**3  # this process's part of the frozen base
        self.step, self.losses, self.pending, self.last_val, self.validated_at = self.start, [], [], {}, None
        self.seconds, self.steps_run = 0.0, 0

    def _build_processes(self) -> None:
        """The processes (world, rank), the batch's split into micro-batches, the accelerator, the
        dtype; TF32 and the seeds."""
        t, tier = self.t, self.tier
        cpu, self.zero = not torch.cuda.is_available(), tier.deepspeed is not None
        # Without a GPU accelerate gives DeepSpeed's ranks no process group of their own: gloo joins them.
        world = (PartialState(backend="gloo") if cpu and self.zero and launched() else PartialState(cpu=cpu)).num_processes
        micro, accum = accumulation_steps(t.batch_size, tier.batch_size, world)
        self.accelerator = acc = Accelerator(
            mixed_precision=tier.mixed_precision,
            gradient_accumulation_steps=accum,
            deepspeed_plugin=deepspeed_plugin(tier, accum, micro, t.max_grad_norm),
            cpu=cpu and not self.zero,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=self.family.unused_parameters)],
        )
        self.world, self.micro, self.accum = world, micro, accum
        self.rank, self.main, self.device = acc.process_index, acc.is_main_process, acc.device
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tier.mixed_precision, torch.float32)
        if t.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(t.seed)

    def _build_data(self) -> tuple[LatentCache, dict, CachedPairs]:
        """The latent cache, the captions dataset, the training pairs, and the run's length."""
        r, t = self.cfg.recipe, self.t
        cache = LatentCache.load(current_fingerprint(self.cfg))
        dataset = load_dataset_dir(CAPTIONS_DIR)
        data = training_pairs(
            cache, dataset["train"], r.columns.conditioning_image, r.data.resolution, t.seed if t.shuffle_conditions else None
        )
        if t.shuffle_conditions:
            print("train: shuffle_conditions is on: every image is paired with another sample's condition (a planted failure)")
        micro_per_epoch = batches_for(data, self.micro, t.seed, world=self.world).per_epoch
        self.max_steps = t.max_train_steps or t.num_train_epochs * max(1, micro_per_epoch // self.accum)
        return cache, dataset, data

    def _build_models(self, ref: BaseRef):
        """The frozen base (its VAE and text encoders stay on the CPU, for validation) and the
        ControlNet the family makes from it, with the tier's switches; the frozen denoiser on the
        device: cast, and sharded across the processes with ``shard_frozen``."""
        tier, device, dtype = self.tier, self.device, self.dtype
        base = load_base(ref)
        for m in (base.vae, *base.text_encoders, base.denoiser):
            m.requires_grad_(False).eval()
        controlnet = self.adapter.make(self.family, base, self.t, self.cfg.recipe.adapter)
        # shard_frozen: every process holds 1/N of the frozen base, and every process validates (a
        # forward gathers each block from all of them)
        self.sharded = tier.shard_frozen and self.world > 1
        self.validates = self.main or self.sharded
        if tier.shard_frozen and not self.sharded:
            self.accelerator.print("train: shard_frozen: one process, nothing to shard across: the frozen base is held whole")
        scheme = self.cfg.recipe.base.quantize
        if scheme != "none":  # the base's own quantisation takes the place of the tier's fp8 storage
            if self.sharded:
                raise ConfigError(f"base.quantize: {scheme} with shard_frozen (FSDP2 shards bf16 weights): expected none")
            tier = tier_with(tier, scheme)
        if tier.frozen_fp8 or self.sharded or scheme != "none":  # on the CPU first: the GPU never holds it whole in bf16
            base.denoiser.to(dtype=dtype)
            quantize_frozen(base.denoiser, scheme, dtype, device)  # int8, nf4: each layer quantised as it moves
            apply_model_settings(base.denoiser, controlnet, tier, dtype)
            if self.sharded:
                shard_frozen(base.denoiser, device, self.world)  # its shards move to the device
            else:
                base.denoiser.to(device)
        else:
            base.denoiser.to(device, dtype=dtype)
            apply_model_settings(base.denoiser, controlnet, tier, dtype)
        direct_attention_calls(base.denoiser, controlnet)  # the same computation, less Python per step
        if not self.zero:  # DeepSpeed holds its own copies
            master_weights(controlnet, dtype)
        controlnet.train()
        return base, controlnet

    def _build_optimization(self, controlnet: torch.nn.Module) -> None:
        """The optimizer (its parameter groups, the tier's kind), the schedule, both prepared with
        the ControlNet by accelerate; the EMA, checkpointed with them."""
        t, acc, world = self.t, self.accelerator, self.world
        lr = t.learning_rate * (t.batch_size if t.scale_lr else 1)
        groups = param_groups(controlnet, lr, t.new_layers_lr_multiplier, self.adapter.new_layers(self.family))
        optimizer = make_optimizer(groups, self.tier, t, lr)
        lr_scheduler = get_scheduler(
            t.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=t.lr_warmup_steps * world,
            num_training_steps=self.max_steps * world,
            num_cycles=t.lr_num_cycles,
            power=t.lr_power,
        )
        self.controlnet, self.optimizer, self.lr_scheduler = acc.prepare(controlnet, optimizer, lr_scheduler)
        self.ema = None
        if t.ema_decay is not None:  # diffusers' EMA (with its warm-up: decay min(d, (1+n)/(10+n)))
            self.ema = EMAModel(acc.unwrap_model(self.controlnet).parameters(), decay=t.ema_decay, foreach=True)
            self.ema.to(self.device)
            acc.register_for_checkpointing(self.ema)  # saved and restored with the run's state

    def _loss_inputs(self, base, cache: LatentCache) -> LossInputs:
        t = self.t
        return LossInputs(
            controlnet=self.controlnet,
            denoiser=base.denoiser,
            scheduler=base.noise_scheduler,
            empty_prompt=cache.empty_prompt,
            scaling_factor=cache.scaling_factor,
            p_empty=t.proportion_empty_prompts,
            device=self.device,
            dtype=self.dtype,
            objective=objective(t),
            family=self.family,
            adapter=self.adapter,
            channels_last=self.tier.channels_last,
            shift_factor=cache.shift_factor,
        )

    def _build_checkpointer(self, cache_fingerprint: str) -> None:
        """This run's checkpointer, and where it resumes: its state loaded, or a fresh start that
        clears this run's logs and checkpoints (never another run's)."""
        t, acc, train_dir = self.t, self.accelerator, self.train_dir
        settings = run_settings(self.cfg, self.tier, cache_fingerprint, self.micro, self.accum, self.world, self.max_steps)
        checkpoints = train_dir / "checkpoints"
        self.checkpointer = Checkpointer(
            checkpoints, settings, t.checkpointing_steps, t.checkpoints_total_limit, main=self.main, barrier=acc.wait_for_everyone
        )
        resume, why = self.checkpointer.resume_point(t.resume_from_checkpoint, self.max_steps)
        acc.print(f"train: {why}")
        self.start = 0
        if resume is not None:
            acc.load_state(str(resume))
            self.start = read_state(resume)["step"]
        elif self.main:  # a fresh start: this run's logs and checkpoints go; other runs' checkpoints stay
            for p in train_dir.iterdir() if train_dir.is_dir() else []:
                if p.name != checkpoints.name:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            self.checkpointer.clear(self.max_steps)
            train_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()

    def _build_reporting(self, data: CachedPairs, dataset: dict, base) -> None:
        """The batches from the resume point, the trackers, and the validator."""
        cfg, r, t = self.cfg, self.cfg.recipe, self.t
        sampler = batches_for(data, self.micro, t.seed, start=self.start * self.accum, rank=self.rank, world=self.world)
        self.stream = batch_stream(data, sampler, t.dataloader_num_workers)
        run_config = {
            "recipe": cfg.recipe_name,
            "tier": self.tier_name,
            **self.tier.model_dump(),
            **t.model_dump(exclude={"validation"}),
        }
        self.trackers = (
            Trackers(t.report_to, self.train_dir, t.tracker_project_name, run_config, resume=self.start > 0)
            if self.main
            else None
        )
        pairs = validation_pairs(
            t.validation,
            dataset["validation"],
            r.columns.conditioning_image,
            r.columns.caption,
            r.data.resolution,
            recipe_buckets(r),
        )
        self.validator = Validator(
            base,
            pairs,
            t.validation,
            r.data.resolution,
            t.seed,
            load_extractor(EVALUATOR_DIR),
            self.trackers,
            self.train_dir,
            self.adapter,
        )

    @contextmanager
    def weights(self) -> Iterator[torch.nn.Module]:
        """The ControlNet with the weights validation, the sweep and export use (the EMA's if any)."""
        with with_weights(self.accelerator.unwrap_model(self.controlnet), self.ema) as model:
            yield model

    def write_state(self, folder: Path) -> None:
        self.accelerator.save_state(str(folder))  # every process: its RNG state, and under DeepSpeed its shards
        if not self.main:
            return
        if self.zero:  # the sweep's weights, in fp32
            consolidate_zero(folder)
        if self.ema is not None:  # the sweep's weights, keyed like the model's
            with self.weights() as model:
                save_file(model.state_dict(), str(Path(folder) / EMA_WEIGHTS))

    def validate(self, step: int) -> None:
        """Validation at ``step`` (the main process scores, saves and logs it; with a sharded base
        the others take part in its forwards)."""
        with self.weights() as model:
            self.last_val = self.validator.validate(step, model, write=self.main)  # {} where it does not write
        self.validated_at = step

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step (``accum`` micro-batches); the mean loss, on the device."""
        acc, t = self.accelerator, self.t
        step_loss = torch.zeros((), device=acc.device)  # summed on the device: no host sync per micro-step
        for m in range(self.accum):
            batch = next(self.stream)
            with acc.accumulate(self.controlnet):
                loss = controlnet_loss(self.loss_inputs, batch, step_generator(t.seed, step, m, self.rank))
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.controlnet.parameters(), t.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=self.tier.set_grads_to_none)
            step_loss += loss.detach() / self.accum
        if self.ema is not None:
            self.ema.step(self.accelerator.unwrap_model(self.controlnet).parameters())
        return step_loss

    def run(self, until: int | None = None) -> None:
        """Train from the current step to ``until`` (default: the last), checkpointing, logging
        and validating on the components' schedules."""
        last, until = self.max_steps, min(until or self.max_steps, self.max_steps)
        t0 = time.time()
        bar = progress(
            range(self.step, until), initial=self.step, total=last, desc=f"train: {self.adapter.title}", disable=not self.main
        )
        for step in bar:
            self.pending.append(self.train_step(step))
            done = self.step = step + 1
            self.steps_run += 1
            if done % 10 == 0 or done == last:  # one host sync per 10 steps
                self.losses += torch.stack(self.pending).tolist()
                self.pending.clear()
                bar.set_postfix(loss=f"{np.mean(self.losses[-50:]):.4f}", refresh=False)  # shown at the next redraw
                if self.main:
                    self.trackers.log({"loss": float(np.mean(self.losses[-10:])), "lr": self.lr_scheduler.get_last_lr()[0]}, done)
            if self.checkpointer.should_save(done, last):
                state = {"micro_batches_read": done * self.accum, "tier": self.tier_name}
                self.checkpointer.save(done, self.write_state, state)
            if self.validates and self.validator.should_validate(done, last):
                self.validate(done)
        self.seconds += time.time() - t0

    def finish(self, out_dir: Path) -> dict:
        """Save the trained ControlNet to ``out_dir`` (diffusers format) and return the run's summary."""
        acc, t = self.accelerator, self.t
        if self.validates and self.validated_at != self.max_steps:  # resumed at the last step: it still belongs
            self.validate(self.max_steps)
        acc.wait_for_everyone()
        if self.main:
            self.trackers.close()
            out = fresh_dir(out_dir)
            with self.weights() as model:
                if self.zero and self.ema is None:  # DeepSpeed's fp32 master weights, not the engine's half-precision copy
                    model = consolidated(model, self.checkpointer.dir / f"checkpoint-{self.max_steps}")
                self.adapter.save(model, out, self.cfg.recipe.adapter.model_dump())
            write_json(out / ADAPTER_FILE, self.cfg.recipe.adapter.model_dump())
        return {
            "adapter": self.adapter.name,
            "tier": self.tier_name,
            "micro_batch": self.micro,
            "gradient_accumulation_steps": self.accum,
            "processes": self.world,
            "frozen_gib_per_process": round(self.frozen_gib, 6),
            "effective_batch": self.micro * self.accum * self.world,
            "steps": self.max_steps,
            "resumed_from_step": self.start,
            "checkpoints": self.checkpointer.dir.as_posix(),  # this run's: the evaluate stage sweeps them
            "levers": {k: getattr(t, k) for k in LEVERS},
            "final_loss": float(np.mean(self.losses[-50:])) if self.losses else None,
            **self.last_val,
            "train_seconds": round(self.seconds, 1),
            "steps_per_second": round(self.steps_run / self.seconds, 3) if self.steps_run else None,
        }
