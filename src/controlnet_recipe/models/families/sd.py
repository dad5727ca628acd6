"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, its last hidden states condition the UNet.
Families built on the same UNet and pipeline layout (SDXL) extend this one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .family import TEXT, BaseComponents, Family, tokenize

if TYPE_CHECKING:
    import torch

    from ...config import TrainCfg
    from ...diffusion import Noised, Objective

DEFAULT_HINT_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNet hint encoder: 3 downsamplings (8x)


def controlnet_from_unet(unet, vae_config, hint_init: str = "zero"):
    """Copy the UNet's encoder; the hint encoder downsamples as much as the VAE does.

    ``hint_init``: ``zero`` (upstream) leaves the hint encoder's last convolution at zero, as
    ``from_unet`` makes it, so the copied encoder sees no condition until that layer has grown;
    ``random`` gives it PyTorch's default init, so the condition reaches the copied encoder from
    the first step. Either way the zero convolutions on the outputs keep the base unchanged at
    step 0."""
    from diffusers import ControlNetModel

    if hint_init == "copy":
        raise ValueError("train.hint_init: copy is for SD3 and Flux (their condition is a latent); expected zero or random")
    downs = len(vae_config["block_out_channels"]) - 1
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=DEFAULT_HINT_CHANNELS[: downs + 1])
    if hint_init == "random":
        model.controlnet_cond_embedding.conv_out.reset_parameters()
    return model


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
    controlnet_class = "ControlNetModel"
    new_layers = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")  # hint encoder, zero convs
    denoiser_name = "unet"
    cache_parts = ("vae", "text_encoder", "tokenizer")
    text_features = (TEXT,)

    def load(
        self, name_or_path: str, revision: str | None, vae: str | None = None, max_sequence_length: int | None = None
    ) -> BaseComponents:
        """Each component from its subfolder, exactly as for ``stabilityai/stable-diffusion-2-1-base``."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        kw = {"revision": revision}
        return BaseComponents(
            family=self.name,
            tokenizer=AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **kw),
            text_encoder=CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", **kw),
            vae=load_vae(name_or_path, revision, vae),
            denoiser=UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", **kw),
            noise_scheduler=DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw),
            **self.more_components(name_or_path, revision),
        )

    def more_components(self, name_or_path: str, revision: str | None) -> dict:
        """What a derived family loads besides SD's components (BaseComponents' other fields)."""
        return {}

    def tiny_components(self, tokenizer, vocab_size: int, text_encoder, vae, resolution: int) -> BaseComponents:
        from .. import tiny

        return BaseComponents(
            family=self.name,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            denoiser=tiny.build_unet(resolution),
            noise_scheduler=tiny.build_scheduler(),
        )

    def tiny_objective(self, snr_gamma: float | None) -> Objective:
        from ...diffusion import Objective

        return Objective(weighting="none" if snr_gamma is None else "min_snr", snr_gamma=snr_gamma or 5.0)

    def noise(self, scheduler, x0, generator, objective: Objective) -> Noised:
        from ...diffusion import ddpm_inputs

        return ddpm_inputs(scheduler, x0, generator, objective)

    def make_controlnet(self, base: BaseComponents, t: TrainCfg):
        if t.controlnet_layers is not None or t.controlnet_single_layers is not None:
            raise ValueError(
                f"train.controlnet_layers: expected null for {self.title} (its ControlNet copies the UNet's encoder)"
            )
        return controlnet_from_unet(base.denoiser, base.vae.config, t.hint_init)

    def residuals(self, controlnet, noised: Noised, text: dict, batch: dict, control, device):
        return controlnet(
            noised.noisy,
            noised.timesteps,
            encoder_hidden_states=text[TEXT].to(device),
            controlnet_cond=control,
            added_cond_kwargs=self.added_cond_kwargs(text, batch, device),
            return_dict=False,
        )

    def predict(self, denoiser, noised: Noised, text: dict, batch: dict, residuals, dtype, device):
        added = self.added_cond_kwargs(text, batch, device)
        if added is not None:
            added = {**added, "text_embeds": added["text_embeds"].to(dtype)}
        extra = {}
        if residuals is not None:
            down, mid = residuals
            extra = dict(down_block_additional_residuals=[d.to(dtype) for d in down], mid_block_additional_residual=mid.to(dtype))
        return denoiser(
            noised.noisy.to(dtype),
            noised.timesteps,
            encoder_hidden_states=text[TEXT].to(device, dtype),
            added_cond_kwargs=added,
            **extra,
        ).sample

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
            unet=base.denoiser,
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
