"""One training step's computation, shared by the train stage, the benchmarks and the GPU check:
the loss of one micro-batch, whatever the base's family (the family noises, runs the ControlNet
and the frozen denoiser; this module draws, drops captions and weighs)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..adapters import Adapter, adapter
from ..core.config import TrainCfg
from ..models.families import FAMILIES, Family, LatentSpace
from ..models.families.sd import DEFAULT_HINT_CHANNELS, controlnet_from_unet
from ..objectives.diffusion import Objective, condition_weights, diffusion_loss, drop_caption_features, sample_latents

__all__ = ["DEFAULT_HINT_CHANNELS", "LossInputs", "controlnet_from_unet", "controlnet_loss", "objective"]


def objective(t: TrainCfg) -> Objective:
    """The training objective that ``train``'s levers name (``Objective()`` is SD upstream's)."""
    return Objective(
        t.timestep_sampling,
        t.logit_mean,
        t.logit_std,
        t.loss_weighting,
        t.snr_gamma,
        t.condition_loss_weight,
        mode_scale=t.mode_scale,
        shift=t.flow_shift,
    )


@dataclass
class LossInputs:
    """What one micro-batch's loss needs besides the batch and its generator: the models, the
    empty caption's text features (the family's, for caption dropout), the VAE's latent scaling,
    the objective and the precision."""

    controlnet: object
    denoiser: object
    scheduler: object
    empty_prompt: dict[str, torch.Tensor]
    scaling_factor: float
    p_empty: float
    device: object
    dtype: torch.dtype
    objective: Objective
    family: Family = field(default_factory=lambda: FAMILIES["sd"])
    adapter: Adapter = field(default_factory=lambda: adapter("controlnet"))  # the kind ``controlnet`` holds
    channels_last: bool = False
    shift_factor: float = 0.0

    @property
    def latents(self) -> LatentSpace:
        return LatentSpace(self.scaling_factor, self.shift_factor)


def controlnet_loss(x: LossInputs, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Sample the latents (and the control latents), noise them, run the trained module (a
    ControlNet, or another kind of control) and the frozen denoiser, and take the (weighted) MSE.
    With upstream's levers this is upstream's computation, draw for draw (tests/test_objective.py,
    per family)."""
    g, device, fam, kind = generator, x.device, x.family, x.adapter
    obj = fam.objective(x.objective)
    x0 = sample_latents(batch["latent_mean"], batch["latent_std"], x.scaling_factor, g, x.shift_factor).to(device)
    noised, control = fam.noise_and_control(x.scheduler, x0, batch, x.latents, g, obj, device)
    text = drop_caption_features({k: batch[k] for k in x.empty_prompt}, x.empty_prompt, x.p_empty, g)
    if x.channels_last:
        noised = noised._replace(noisy=noised.noisy.contiguous(memory_format=torch.channels_last))
        control = control.contiguous(memory_format=torch.channels_last)
    half = next(x.controlnet.parameters()).dtype
    # DeepSpeed holds the ControlNet in half precision and autocasts nothing: its inputs follow it
    with torch.autocast(torch.device(device).type, dtype=half) if half != torch.float32 else nullcontext():
        residuals = kind.residuals(fam, x.controlnet, noised, text, batch, control, device)
    pred = fam.output(kind.predict(fam, x.denoiser, noised, text, batch, residuals, x.dtype, device), noised, obj)
    spatial = condition_weights(batch["conditioning"].to(device), tuple(pred.shape[-2:]), obj.condition_weight)
    return diffusion_loss(pred, noised.target, noised.weights, spatial)
