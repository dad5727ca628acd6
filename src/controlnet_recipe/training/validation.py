"""Validation during training: images from fixed conditions, prompts and seeds, scored by the
evaluator's condition extractor (``val/fidelity``), so the curves show when control appears."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..core.buckets import nearest
from ..core.config import ValidationCfg
from ..core.errors import BadInput
from ..core.images import images_to_tensor, tensor_to_images
from ..models.base_model import call_arguments, make_pipeline, seeded
from ..models.families import family
from ..models.families.family import compute_dtype
from ..report.grid import make_grid


@dataclass
class ValidationPairs:
    conditions: list[Image.Image]
    prompts: list[str]


def _load_condition(path: str, resolution: int, buckets: list | None = None) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            size = nearest(*img.size, buckets) if buckets else resolution  # with buckets: at its own aspect
            # RGBA and palette images are flattened to RGB (upstream fails on them: https://github.com/huggingface/diffusers/issues/2908).
            cond = images_to_tensor([img], size, normalize=False)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise BadInput(f"train.validation.images: {path}: cannot read ({e.__class__.__name__})") from None
    return tensor_to_images(cond * 2 - 1)[0]


def validation_pairs(
    v: ValidationCfg, held_out, condition_column: str, caption_column: str, resolution: int, buckets: list | None = None
) -> ValidationPairs:
    """Upstream's pairing of validation images and prompts (N:N, 1:N, N:1), or the first
    ``held_out`` conditions of the validation split with their captions. With aspect ``buckets``
    each condition keeps its bucket's size (a given image: fitted to its nearest bucket)."""
    if v.images:
        conds = [_load_condition(p, resolution, buckets) for p in v.images]
        prompts = list(v.prompts) or [""]
    else:
        rows = held_out.select(range(min(v.held_out, len(held_out))))
        keep = buckets is not None  # stored at their bucket's size already
        conds = [
            c.convert("RGB") if keep else c.convert("RGB").resize((resolution, resolution), Image.NEAREST)
            for c in rows[condition_column]
        ]
        prompts = list(v.prompts) or list(rows[caption_column])
    n = max(len(conds), len(prompts))
    conds = conds * n if len(conds) == 1 else conds
    prompts = prompts * n if len(prompts) == 1 else prompts
    return ValidationPairs(conds, prompts)


@torch.no_grad()
def run_validation(
    base, controlnet, pairs: ValidationPairs, v: ValidationCfg, resolution: int, seed: int, extractor=None, adapter=None
) -> tuple[Image.Image, dict[str, float]]:
    """Generate ``v.num_images`` images per pair (seeds fixed across validations); return a grid
    (condition | images) and, with the evaluator's extractor, the images' condition fidelity."""
    device = next(base.denoiser.parameters()).device
    train_dtype = compute_dtype(base.denoiser)  # frozen_fp8, base.quantize: stored in fewer bytes, computed in this
    if device.type == "cuda":
        # the blocks that held the step's activations go back first: what validation loads (the
        # VAE, the text encoders) then fits where they were instead of on top (planning/plan.py)
        torch.cuda.empty_cache()
    # CPU autocast leaves group_norm in mixed dtypes: validate in fp32 there (the round trip of the
    # frozen UNet through fp32 is lossless).
    dtype = torch.float32 if device.type == "cpu" else train_dtype
    if dtype != train_dtype:
        base.denoiser.to(dtype=dtype)
    fam = family(base.family)
    base.vae.to(device, dtype)
    encoders = base.text_encoders if fam.encodes_prompts_on_device else []
    for encoder in encoders:
        encoder.to(device, dtype)
    pipe = make_pipeline(base, controlnet, adapter)  # already on the device: the training loop placed it
    was_training = controlnet.training
    controlnet.eval()
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    rows, images, conds = [], [], []
    with autocast:
        for i, (cond, prompt) in enumerate(zip(pairs.conditions, pairs.prompts)):
            gens = seeded([seed + 1000 * i + k for k in range(v.num_images)])
            out = pipe(
                num_inference_steps=v.num_inference_steps,
                generator=gens,
                height=cond.size[1],  # the condition's own size: square at resolution, or its aspect bucket
                width=cond.size[0],
                **call_arguments(
                    adapter,
                    fam.validation_inputs(base, prompt, v.num_images, v.guidance_scale, [cond] * v.num_images, device, dtype),
                ),
            ).images
            rows.append([cond, *out])
            images += out
            conds += [cond] * len(out)
    controlnet.train(was_training)
    if dtype != train_dtype:
        base.denoiser.to(dtype=train_dtype)
    base.vae.to("cpu")
    for encoder in encoders:
        encoder.to("cpu")
    metrics = {}
    if extractor is not None:  # the evaluator's condition extractor: its headline score, as the evaluation's
        metrics["val/fidelity"] = float(np.nanmean(extractor.scores(images, conds)[extractor.headline]))
    titles = ["condition"] + [f"seed {k}" for k in range(v.num_images)]
    return make_grid(rows, col_titles=titles), metrics


def load_extractor(folder: Path):
    """The evaluator stage's condition extractor, if that stage has run; validation then scores images."""
    from ..conditions.extractor import Extractor

    return Extractor.load(folder)


class Validator:
    """Validation during training: when (every ``validation.steps`` and at the last step), on what
    (the fixed pairs), scored by the evaluator's extractor, and logged (grid and metrics)."""

    def __init__(
        self,
        base,
        pairs: ValidationPairs,
        v: ValidationCfg,
        resolution: int,
        seed: int,
        extractor,
        trackers,
        out: Path,
        adapter=None,
    ):
        self.base, self.pairs, self.v, self.resolution, self.seed = base, pairs, v, resolution, seed
        self.extractor, self.trackers, self.out, self.adapter = extractor, trackers, out, adapter

    def should_validate(self, step: int, last: int) -> bool:
        return step % self.v.steps == 0 or step == last

    def validate(self, step: int, controlnet, write: bool = True) -> dict[str, float]:
        """Images from ``controlnet`` (the weights to validate), saved, logged and scored; ``write``
        false: only drawn (a process that takes part in a sharded base's forwards)."""
        extractor = self.extractor if write else None
        grid, metrics = run_validation(
            self.base, controlnet, self.pairs, self.v, self.resolution, self.seed, extractor, self.adapter
        )
        if not write:
            return {}
        grid.save(self.out / "validation.png")
        self.trackers.log_image("validation", grid, step)
        self.trackers.log(metrics, step)
        return metrics
