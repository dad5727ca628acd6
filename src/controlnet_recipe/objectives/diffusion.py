"""Diffusion training pieces shared by the base and ControlNet stages: image encoding, noising, loss.
(Text encoding is the model family's: models/families.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ..core.logs import progress


@torch.no_grad()
def encode_images(
    vae, pixels: torch.Tensor, batch_size: int = 64, desc: str | None = "encode latents"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of each image ([-1, 1] pixels), unscaled. Sampling from these each
    step is exactly what encoding each step would do, without running the encoder again."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    means, stds = [], []
    for i in progress(range(0, len(pixels), batch_size), desc=desc, leave=False, disable=desc is None):
        dist = vae.encode(pixels[i : i + batch_size].to(device, dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def sample_latents(
    mean: torch.Tensor,
    std: torch.Tensor,
    scaling_factor: float,
    generator: torch.Generator | None = None,
    shift_factor: float = 0.0,
) -> torch.Tensor:
    """A posterior sample as the model sees it: (sample - shift) x scale (SD3's, Flux's VAEs shift)."""
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    sample = mean + std * noise
    return (sample - shift_factor if shift_factor else sample) * scaling_factor


@dataclass(frozen=True)
class Objective:
    """How a training step draws timesteps and weights the loss. ``Objective()`` is upstream's:
    uniform timesteps and a plain MSE.

    - ``timesteps``: ``uniform`` (upstream), ``cubic`` (T2I-Adapter: t = (1 - u^3) T, so most
      steps are high-noise ones, where the layout is decided), ``logit_normal`` (t = sigmoid(n) T
      with n ~ N(logit_mean, logit_std), as SD3 trains);
    - ``weighting``: ``none`` (upstream) or ``min_snr`` (Hang et al. 2023: min(SNR, gamma) / SNR
      for epsilon prediction, min(SNR, gamma) / (SNR + 1) for v-prediction);
    - ``condition_weight``: 1 (upstream), or how much more the latent pixels under the condition's
      drawing (its non-black pixels: the face parts, the edges) count in the MSE than the rest.

    Flow matching (objectives/flow_matching.py) reads the same fields, plus ``mode`` timesteps
    (``mode_scale``), ``shift``, ``sigma_sqrt``/``cosmap`` weightings and ``precondition``
    (the families set the last: SD3's upstream preconditions, Flux's does not).
    """

    timesteps: Literal["uniform", "cubic", "logit_normal", "mode"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting: Literal["none", "min_snr", "sigma_sqrt", "cosmap"] = "none"
    snr_gamma: float = 5.0
    condition_weight: float = 1.0
    mode_scale: float = 1.29
    shift: float | None = None
    precondition: bool = False


class Noised(NamedTuple):
    """One step's noising: the model's input, its timesteps, the target, per-sample loss weights
    (None: unweighted) and, for flow matching, the sigmas."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None
    sigmas: torch.Tensor | None = None


UPSTREAM = Objective()


def sample_timesteps(
    n: int, num_train_timesteps: int, objective: Objective = UPSTREAM, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n,) integer timesteps in [0, num_train_timesteps)."""
    if objective.timesteps == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    if objective.timesteps == "cubic":
        u = torch.rand(n, generator=generator)
        return ((1 - u**3) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    if objective.timesteps == "mode":
        raise ValueError(
            "train.timestep_sampling: mode is for flow matching (sd3, flux); expected uniform | cubic | logit_normal"
        )
    z = torch.randn(n, generator=generator) * objective.logit_std + objective.logit_mean
    return (torch.sigmoid(z) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def noisy_inputs(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None, objective: Objective = UPSTREAM):
    """(noisy latents, timesteps, target) for one training step. With the upstream objective the
    draws are upstream's, in its order: the noise, then uniform timesteps."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    t = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, objective, generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"scheduler prediction_type: unsupported {scheduler.config.prediction_type!r}")
    return noisy, t, target


def ddpm_inputs(scheduler, x0: torch.Tensor, generator: torch.Generator | None = None, objective: Objective = UPSTREAM) -> Noised:
    """:class:`Noised` for one epsilon / v-prediction step (:func:`noisy_inputs`, :func:`loss_weights`)."""
    noisy, t, target = noisy_inputs(scheduler, x0, generator, objective)
    return Noised(noisy, t, target, loss_weights(scheduler, t, objective))


def loss_weights(scheduler, timesteps: torch.Tensor, objective: Objective = UPSTREAM) -> torch.Tensor | None:
    """Per-sample loss weights (None: unweighted, as upstream)."""
    if objective.weighting == "none":
        return None
    if objective.weighting != "min_snr":
        raise ValueError(f"train.loss_weighting: {objective.weighting} is for flow matching (sd3, flux); expected none | min_snr")
    snr = compute_snr(scheduler, timesteps)  # diffusers' own, as its text-to-image example uses it
    clipped = snr.clamp(max=objective.snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None, spatial: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE; with ``weights``, each sample's mean squared error times its weight, averaged; with
    ``spatial`` (N, 1, h, w), each sample's error is the ``spatial``-weighted mean over its pixels."""
    if weights is None and spatial is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    dims = tuple(range(1, pred.ndim))
    if spatial is None:
        per_sample = err.mean(dim=dims)
    else:
        spatial = spatial.to(err)
        per_sample = (err * spatial).mean(dim=dims) / spatial.expand_as(err).mean(dim=dims)
    return (per_sample * (1 if weights is None else weights.to(per_sample))).mean()


def condition_weights(conditioning: torch.Tensor, latent_hw: tuple[int, int], weight: float) -> torch.Tensor | None:
    """(N, 1, h, w) loss weights: 1 where the condition image ([0, 1], N x 3 x H x W) is black,
    ``weight`` where it draws something, averaged over each latent pixel's patch. None at weight 1."""
    if weight == 1:
        return None
    drawn = (conditioning.amax(dim=1, keepdim=True) > 0.05).float()
    return 1 + (weight - 1) * F.adaptive_avg_pool2d(drawn, latent_hw)


def drop_captions(
    embeddings: torch.Tensor, empty: torch.Tensor, proportion: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace a ``proportion`` of the batch's caption embeddings with the empty caption's."""
    return drop_caption_features({"text": embeddings}, {"text": empty}, proportion, generator)["text"]


def drop_caption_features(
    features: dict[str, torch.Tensor],
    empty: dict[str, torch.Tensor],
    proportion: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`drop_captions` for every text feature of a family (SDXL: the embedding and the
    pooled embedding): one draw per sample, the same samples dropped in each."""
    if proportion <= 0:
        return features
    n = next(iter(features.values())).shape[0]
    keep = torch.rand(n, generator=generator) >= proportion
    out = {}
    for k, v in features.items():
        mask = keep.view(-1, *[1] * (v.ndim - 1)).to(v.device)
        out[k] = torch.where(mask, v, empty[k].to(v))
    return out
