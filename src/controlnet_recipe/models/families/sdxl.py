"""Stable Diffusion XL: two text encoders (CLIP ViT-L and OpenCLIP bigG). Their penultimate hidden
states, concatenated, condition the UNet through cross-attention; the second's pooled (projected)
embedding and six ``time_ids`` (original size, crop top-left, target size) enter through the
timestep embedding (``added_cond_kwargs``), in the ControlNet as in the UNet.

The VAE overflows in fp16: pass ``base.vae`` an fp16-fixed VAE (madebyollin/sdxl-vae-fp16-fix),
or leave it in fp32 as the cache stage does; the pipelines upcast it when its config says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...core.buckets import cover
from ...core.images import resize_and_crop
from .family import POOLED, TEXT, BaseComponents, tokenize
from .sd import StableDiffusion

if TYPE_CHECKING:
    import torch

TIME_IDS = "time_ids"  # (original h, w, crop top, left, target h, w), per sample, from the cache stage


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    size_multiple = 32  # image sides divide by this: the VAE 8x, the UNet 4x
    title = "Stable Diffusion XL (SDXL)"
    hub_tag = "stable-diffusion-xl"
    pipelines = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLControlNetPipeline")
    pipeline_class = "StableDiffusionXLPipeline"
    controlnet_pipeline_class = "StableDiffusionXLControlNetPipeline"
    controlnet_class = "ControlNetModel"
    cache_parts = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    text_features = (TEXT, POOLED)

    def tiny_components(
        self, tokenizer, vocab_size: int, text_encoder, vae, resolution: int, layers_per_block: int = 1
    ) -> BaseComponents:
        from .. import tiny

        return BaseComponents(
            family=self.name,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            denoiser=tiny.build_unet(resolution, sdxl=True, layers_per_block=layers_per_block),
            noise_scheduler=tiny.build_scheduler(),
            tokenizer_2=tokenizer,
            text_encoder_2=tiny.build_text_encoder_2(vocab_size).eval().requires_grad_(False),
            # Trained with empty captions as the unconditional input: guidance uses them, not zeros.
            options={"force_zeros_for_empty_prompt": False},
        )

    def more_components(self, name_or_path: str, revision: str | None) -> dict:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        kw = {"revision": revision}
        return dict(
            tokenizer_2=AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2", **kw),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(name_or_path, subfolder="text_encoder_2", **kw),
            options=pipeline_options(name_or_path, revision),
        )

    def encode(self, base: BaseComponents, captions: list[str]) -> dict[str, torch.Tensor]:
        """As the SDXL pipelines' ``encode_prompt``: penultimate hidden states of both encoders,
        concatenated on the feature axis, and the second encoder's pooled projection."""
        import torch

        hidden, pooled = [], None
        for tokenizer, encoder in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
            device = next(encoder.parameters()).device
            with torch.no_grad():
                out = encoder(tokenize(tokenizer, captions, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float().cpu())
            pooled = out[0].float().cpu()
        return {TEXT: torch.cat(hidden, dim=-1), POOLED: pooled}

    def image_features(self, images: list, resolution: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        import torch

        return {TIME_IDS: torch.tensor([image_time_ids(img.size, resolution) for img in images])}

    def added_cond_kwargs(self, text: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], device) -> dict:
        return {"text_embeds": text[POOLED].to(device), "time_ids": batch[TIME_IDS].to(device)}

    def more_pipeline_parts(self, base: BaseComponents) -> dict:
        return dict(text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, **base.options)


def pipeline_options(name_or_path: str, revision: str | None) -> dict:
    """Whether the pipeline uses zeros (SDXL base) or the empty prompt's embedding (a base trained
    with empty captions, such as the tiny one) as the negative prompt under guidance."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    return {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}


def time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int], target: int | tuple[int, int]) -> list[float]:
    """SDXL's size and crop conditioning for one sample (the crop in the resized image's pixels;
    ``target``: a square side, or a bucket's (height, width))."""
    th, tw = (target, target) if isinstance(target, int) else target
    return [*map(float, original_hw), *map(float, crop_top_left), float(th), float(tw)]


def image_time_ids(size: tuple[int, int], resolution: int | tuple[int, int]) -> list[float]:
    """The time ids of an image of ``size`` (w, h) as images_to_tensor fits it: its own size, the
    centre crop's corner, the target (a square side, or a bucket's (width, height); a bucketed image
    is stored at its bucket's size, so its crop is (0, 0))."""
    w, h = size
    if isinstance(resolution, int):
        _, _, left, top = resize_and_crop(w, h, resolution)
        return time_ids((h, w), (top, left), resolution)
    crop = cover(w, h, resolution)
    return time_ids((h, w), (crop.top, crop.left), (resolution[1], resolution[0]))
