"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, its last hidden states condition the UNet.
Families built on the same UNet and pipeline layout (SDXL) extend this one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .family import TEXT, BaseComponents, Family, tokenize

if TYPE_CHECKING:
    import torch


class StableDiffusion(Family):
    name = "sd"
    title = "Stable Diffusion"
    hub_tag = "stable-diffusion"
    pipelines = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionControlNetPipeline",
        "StableDiffusionInpaintPipeline",
    )
    pipeline_class = "StableDiffusionPipeline"
    controlnet_pipeline_class = "StableDiffusionControlNetPipeline"
    cache_parts = ("vae", "text_encoder", "tokenizer")
    text_features = (TEXT,)

    def load(self, name_or_path: str, revision: str | None, vae: str | None = None) -> BaseComponents:
        """Each component from its subfolder, exactly as for ``stabilityai/stable-diffusion-2-1-base``."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        kw = {"revision": revision}
        return BaseComponents(
            family=self.name,
            tokenizer=AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **kw),
            text_encoder=CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", **kw),
            vae=load_vae(name_or_path, revision, vae),
            unet=UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", **kw),
            noise_scheduler=DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw),
            **self.more_components(name_or_path, revision),
        )

    def more_components(self, name_or_path: str, revision: str | None) -> dict:
        """What a derived family loads besides SD's components (BaseComponents' other fields)."""
        return {}

    def encode(self, base: BaseComponents, captions: list[str]) -> dict[str, torch.Tensor]:
        import torch

        device = next(base.text_encoder.parameters()).device
        with torch.no_grad():
            return {TEXT: base.text_encoder(tokenize(base.tokenizer, captions, device))[0].float().cpu()}

    def pipeline(self, base: BaseComponents, controlnet=None, scheduler=None):
        import diffusers

        parts = dict(
            vae=base.vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            unet=base.unet,
            scheduler=scheduler or diffusers.UniPCMultistepScheduler.from_config(base.noise_scheduler.config),
            **self.more_pipeline_parts(base),
        )
        if controlnet is None:
            return getattr(diffusers, self.pipeline_class)(**parts)
        return getattr(diffusers, self.controlnet_pipeline_class)(controlnet=controlnet, **parts)

    def more_pipeline_parts(self, base: BaseComponents) -> dict:
        return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_vae(name_or_path: str, revision: str | None, vae: str | None):
    """The base's own VAE, or ``vae`` (a hub id or folder holding an AutoencoderKL) in its place."""
    from diffusers import AutoencoderKL

    if vae:
        return AutoencoderKL.from_pretrained(vae)
    return AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", revision=revision)
