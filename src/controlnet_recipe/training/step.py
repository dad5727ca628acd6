"""One training step's computation, shared by the train stage, the benchmarks and the GPU check:
the ControlNet made from the base UNet, and the loss of one micro-batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import ControlNetModel

from ..config import TrainCfg
from ..diffusion import (
    Objective,
    condition_weights,
    diffusion_loss,
    drop_caption_features,
    loss_weights,
    noisy_inputs,
    sample_latents,
)
from ..models.families import FAMILIES, TEXT, Family

DEFAULT_HINT_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNet hint encoder: 3 downsamplings (8x)


def controlnet_from_unet(unet, vae_config, hint_init: str = "zero") -> ControlNetModel:
    """Copy the UNet's encoder; the hint encoder downsamples as much as the VAE does.

    ``hint_init``: ``zero`` (upstream) leaves the hint encoder's last convolution at zero, as
    ``from_unet`` makes it, so the copied encoder sees no condition until that layer has grown;
    ``random`` gives it PyTorch's default init, so the condition reaches the copied encoder from
    the first step. Either way the zero convolutions on the outputs keep the base unchanged at
    step 0."""
    downs = len(vae_config["block_out_channels"]) - 1
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=DEFAULT_HINT_CHANNELS[: downs + 1])
    if hint_init == "random":
        model.controlnet_cond_embedding.conv_out.reset_parameters()
    return model


def objective(t: TrainCfg) -> Objective:
    """The training objective that ``train``'s levers name (``Objective()`` is upstream's)."""
    return Objective(t.timestep_sampling, t.logit_mean, t.logit_std, t.loss_weighting, t.snr_gamma, t.condition_loss_weight)


@dataclass
class LossInputs:
    """What one micro-batch's loss needs besides the batch and its generator: the models, the
    empty caption's text features (the family's, for caption dropout), the VAE's scaling factor,
    the objective and the precision."""

    controlnet: object
    unet: object
    scheduler: object
    empty_prompt: dict[str, torch.Tensor]
    scaling_factor: float
    p_empty: float
    device: object
    dtype: torch.dtype
    objective: Objective
    family: Family = field(default_factory=lambda: FAMILIES["sd"])
    channels_last: bool = False


def controlnet_loss(x: LossInputs, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Noise the (sampled) latents, run ControlNet + frozen UNet, and take the (weighted) MSE.
    With ``Objective()`` this is upstream's computation, draw for draw."""
    g, device, dtype, objective = generator, x.device, x.dtype, x.objective
    x0 = sample_latents(batch["latent_mean"], batch["latent_std"], x.scaling_factor, g).to(device)
    noisy, ts, target = noisy_inputs(x.scheduler, x0, g, objective)
    text = drop_caption_features({k: batch[k] for k in x.empty_prompt}, x.empty_prompt, x.p_empty, g)
    enc = text[TEXT].to(device)
    added = x.family.added_cond_kwargs(text, batch, device)
    hint = batch["conditioning"].to(device)
    if x.channels_last:
        noisy, hint = noisy.contiguous(memory_format=torch.channels_last), hint.contiguous(memory_format=torch.channels_last)
    down, mid = x.controlnet(
        noisy, ts, encoder_hidden_states=enc, controlnet_cond=hint, added_cond_kwargs=added, return_dict=False
    )
    pred = x.unet(
        noisy.to(dtype),
        ts,
        encoder_hidden_states=enc.to(dtype),
        added_cond_kwargs=None if added is None else {**added, "text_embeds": added["text_embeds"].to(dtype)},
        down_block_additional_residuals=[d.to(dtype) for d in down],
        mid_block_additional_residual=mid.to(dtype),
    ).sample
    spatial = condition_weights(hint, tuple(pred.shape[-2:]), objective.condition_weight)
    return diffusion_loss(pred, target, loss_weights(x.scheduler, ts, objective), spatial)
