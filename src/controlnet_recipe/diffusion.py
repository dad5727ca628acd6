"""Diffusion training pieces shared by the base and ControlNet stages: encoding, noising, loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def encode_text(tokenizer, text_encoder, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(N, tokens, dim) last hidden states, as Stable Diffusion conditions its UNet."""
    device = next(text_encoder.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        ids = tokenizer(
            texts[i : i + batch_size],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        out.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(out)


def caption_embeddings(tokenizer, text_encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample embeddings, the empty caption's embedding), encoding each distinct caption once."""
    unique = sorted(set(captions))
    emb = encode_text(tokenizer, text_encoder, unique + [""])
    row = {c: i for i, c in enumerate(unique)}
    return emb[[row[c] for c in captions]], emb[-1:]


@torch.no_grad()
def encode_images(
    vae, pixels: torch.Tensor, batch_size: int = 64, desc: str | None = "encode latents"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of each image ([-1, 1] pixels), unscaled. Sampling from these each
    step is exactly what encoding each step would do, without running the encoder again."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    means, stds = [], []
    for i in tqdm(range(0, len(pixels), batch_size), desc=desc, leave=False, disable=desc is None):
        dist = vae.encode(pixels[i : i + batch_size].to(device, dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return (mean + std * noise) * scaling_factor


def noisy_inputs(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None):
    """(noisy latents, timesteps, target) for one training step, as upstream draws them."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"scheduler prediction_type: unsupported {scheduler.config.prediction_type!r}")
    return noisy, t, target


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def drop_captions(
    embeddings: torch.Tensor, empty: torch.Tensor, proportion: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace a ``proportion`` of the batch's caption embeddings with the empty caption's."""
    if proportion <= 0:
        return embeddings
    keep = torch.rand(embeddings.shape[0], generator=generator) >= proportion
    return torch.where(keep[:, None, None].to(embeddings.device), embeddings, empty.to(embeddings))
