"""base stage: resolve the frozen base model the ControlNet is trained on.

With ``base.pretrained_model`` named (the real recipe), it only records the id and revision.
With none (the embedded default), it trains a tiny VAE and a tiny text-conditioned denoiser on
the training images and captions, so that the base already draws faces, and saves them as a
Stable Diffusion pipeline folder (SDXL's, SD3's or Flux's with ``base.family``) that later stages
load with ``from_pretrained``. The family (models/families) goes into ``base.json`` for every later stage.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from ..core.config import Config, TinyBaseCfg
from ..core.errors import BadInput
from ..core.images import images_to_tensor, tensor_to_images
from ..core.storage import BASE_DIR, CAPTIONS_DIR, fresh_dir, load_dataset_dir, seed_everything, write_json
from ..faces.synthetic import CAPTION_WORDS
from ..models import tiny
from ..models.base_model import BASE_FILE, BaseRef
from ..models.families import BaseComponents, Family, LatentSpace, detect_family, family, recipe_buckets
from ..models.fit import fit
from ..objectives.diffusion import diffusion_loss, drop_caption_features, encode_images, sample_latents
from ..report.grid import save_grid

# Words the tiny tokenizer keeps whole besides the captions' own: common prompt words.
EXTRA_WORDS = ["photo", "portrait", "of", "the", "an", "in", "man", "woman", "person", "close", "up", "high", "quality"]


def train_vae(vae, pixels: torch.Tensor, cfg: TinyBaseCfg, g: torch.Generator) -> list[float]:
    """Reconstruction + a small KL term, on random half-size crops (the VAE is convolutional)."""
    crop = pixels.shape[-1] // 2

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(pixels), (cfg.vae_batch_size,), generator=g)
        y, x = torch.randint(0, pixels.shape[-1] - crop + 1, (2,), generator=g).tolist()
        batch = pixels[idx, :, y : y + crop, x : x + crop]
        dist = vae.encode(batch).latent_dist
        recon = vae.decode(dist.sample(generator=g)).sample
        kl = dist.kl().mean() / batch[0].numel()
        return torch.nn.functional.mse_loss(recon, batch) + 0.5 * (recon - batch).abs().mean() + 1e-4 * kl

    losses = fit(vae, loss_fn, steps=cfg.vae_steps, lr=cfg.vae_learning_rate, warmup=20, weight_decay=0.0, desc="base: VAE")
    vae.eval().requires_grad_(False)
    return losses


def train_denoiser(
    parts: BaseComponents,
    latents: tuple[torch.Tensor, torch.Tensor],
    space: LatentSpace,
    text: dict[str, torch.Tensor],
    empty: dict[str, torch.Tensor],
    cfg: TinyBaseCfg,
    g: torch.Generator,
    *,
    fam: Family,
    image_features: dict[str, torch.Tensor],
) -> tuple[EMAModel, list[float]]:
    """Text-conditioned denoising on cached latents, with 10% empty captions for guidance, by the
    family's objective: for the UNet families, min-SNR-gamma weighting (``unet_snr_gamma``; Hang
    et al. 2023: in half the steps at twice the batch, it gave the ControlNet trained on it a better
    mIoU and NME than plain MSE, README); for the transformer families, flow matching with
    logit-normal timesteps. ``text`` and ``image_features`` are the family's (SDXL: pooled
    embeddings and time ids too)."""
    model = parts.denoiser
    ema = EMAModel(model.parameters(), decay=0.995, use_ema_warmup=True, power=0.75)
    mean, std = latents
    obj = fam.objective(fam.tiny_objective(cfg.unet_snr_gamma))

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(mean), (cfg.unet_batch_size,), generator=g)
        x0 = sample_latents(mean[idx], std[idx], space.scaling_factor, g, space.shift_factor)
        noised = fam.noise(parts.noise_scheduler, x0, g, obj)
        feats = drop_caption_features({k: v[idx] for k, v in text.items()}, empty, 0.1, g)
        images = {k: v[idx] for k, v in image_features.items()}
        pred = fam.predict(model, noised, feats, images, None, torch.float32, x0.device)
        return diffusion_loss(fam.output(pred, noised, obj), noised.target, noised.weights)

    losses = fit(
        model, loss_fn, steps=cfg.unet_steps, lr=cfg.unet_learning_rate, warmup=50, cosine=False, max_grad_norm=1.0,
        ema=ema, smooth=50, desc=f"base: {fam.denoiser_name}",
    )  # fmt: skip
    return ema, losses


def check_positions(denoiser, buckets: list | None) -> None:
    """A denoiser with a table of positions (the tiny SD3's covers ``resolution`` px sides) must
    cover every bucket's sides."""
    most = getattr(denoiser.config, "pos_embed_max_size", None)
    if most is None or not buckets:
        return
    side = most * denoiser.config.patch_size * 2 ** (len(tiny.VAE_CHANNELS) - 1)  # positions x patch x the tiny VAE's
    for b in buckets:
        if max(b) > side:
            raise BadInput(
                f"data.buckets: {b[0]}x{b[1]}: the tiny SD3 base's position table covers sides up to {side} px; "
                "state buckets no longer than that, or use a pretrained SD3 (positions to 3072 px)"
            )


def train_tiny_base(cfg: Config, family_name: str = "sd") -> dict:
    """Train the embedded default's VAE and denoiser (of ``family_name``'s architecture); save its
    pipeline folder."""
    r = cfg.recipe
    seed_everything(r.base.tiny.seed)
    g = torch.Generator().manual_seed(r.base.tiny.seed)
    ds = load_dataset_dir(CAPTIONS_DIR)["train"]
    images = ds[r.columns.image]
    pixels = images_to_tensor(images, r.data.resolution)
    captions = list(ds[r.columns.caption])
    out = fresh_dir(BASE_DIR)
    folder = out / "pipeline"
    fam = family(family_name)

    tokenizer = tiny.build_tokenizer(
        CAPTION_WORDS + EXTRA_WORDS + " ".join(captions).replace(",", " ").split(), out / "_tokenizer"
    )
    # built in this order (the first text encoder, the VAE, then the rest): the seed gives each its weights
    text_encoder = fam.tiny_text_encoder(len(tokenizer)).eval().requires_grad_(False)
    vae = tiny.build_vae(r.data.resolution)
    vae_losses = train_vae(vae, pixels, r.base.tiny, g)

    mean, std = encode_images(vae, pixels)
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    shift = 0.0
    if fam.shifts_latents:  # SD3's and Flux's VAEs centre their latents too
        shift = float(mean.mean())
        vae.register_to_config(shift_factor=shift)
    parts = fam.tiny_components(tokenizer, len(tokenizer), text_encoder, vae, r.data.resolution, r.base.tiny.layers_per_block)
    check_positions(parts.denoiser, recipe_buckets(r))
    text, empty = fam.caption_features(parts, captions)
    ema, unet_losses = train_denoiser(
        parts, (mean, std), LatentSpace(scale, shift), text, empty, r.base.tiny, g,
        fam=fam, image_features=fam.image_features(images, r.data.resolution),
    )  # fmt: skip
    ema.copy_to(parts.denoiser.parameters())
    parts.denoiser.eval().requires_grad_(False)

    fam.pipeline(parts, scheduler=parts.noise_scheduler).save_pretrained(folder)
    shutil.rmtree(out / "_tokenizer")

    # What the base draws from a few training captions, beside the real images.
    pipe = fam.pipeline(parts)
    pipe.set_progress_bar_config(disable=True)  # 20 steps in a second: no bar
    n = 8
    gen = torch.Generator().manual_seed(0)
    fakes = pipe(
        captions[:n], num_inference_steps=20, generator=gen, height=r.data.resolution, width=r.data.resolution,
        **fam.sampling_kwargs(parts, n, 3.0),
    ).images  # fmt: skip
    recon = vae.decode(mean[:n]).sample
    save_grid(
        [images[:n], tensor_to_images(recon), fakes],
        out / "samples.png",
        row_titles=["real", "VAE recon", "base samples"],
    )
    return {
        "vae_final_loss": float(np.mean(vae_losses[-50:])),
        "unet_final_loss": float(np.mean(unet_losses[-100:])),
        "latent_scaling_factor": scale,
        **({"latent_shift_factor": shift} if fam.shifts_latents else {}),
    }


def main(cfg: Config) -> None:
    b = cfg.recipe.base
    if b.pretrained_model:
        out = fresh_dir(BASE_DIR)
        name = detect_family(b.pretrained_model, b.revision) if b.family == "auto" else b.family
        ref = BaseRef(b.pretrained_model, b.revision, name, b.vae, b.max_sequence_length)
        summary = {"trained": False}
    else:
        name = "sd" if b.family == "auto" else b.family
        summary = {"trained": True, **train_tiny_base(cfg, name)}
        out = BASE_DIR
        # the tiny T5's captions are as long as CLIP's (the families' defaults are for the real T5-XXL)
        tokens = b.max_sequence_length or (tiny.MAX_TOKENS if family(name).default_max_sequence_length else None)
        ref = BaseRef(str(out / "pipeline"), None, name, b.vae, tokens)
    write_json(out / BASE_FILE, ref.__dict__)
    write_json(out / "summary.json", summary)
    print(f"base: {ref.name_or_path} ({ref.family}) {summary}")
