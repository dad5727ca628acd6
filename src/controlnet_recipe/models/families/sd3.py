"""Stable Diffusion 3 / 3.5: an MMDiT rectified-flow transformer. Captions enter as CLIP-L's and
CLIP-G's penultimate hidden states (concatenated, padded to T5's width) followed by T5-XXL's, and
the two CLIPs' pooled projections; latents are 16-channel, shifted and scaled. The ControlNet
(``SD3ControlNetModel.from_transformer``) copies the embedders and the leading joint blocks and
takes the condition as latents through a zero-initialised patch embedding. Upstream's
train_controlnet_sd3.py preconditions the output (x0 = output x (-sigma) + x_t, target x0)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .family import POOLED, TEXT, BaseComponents
from .flow import FlowFamily

if TYPE_CHECKING:
    from ...config import TrainCfg
    from ...diffusion import Objective


class StableDiffusion3(FlowFamily):
    name = "sd3"
    title = "Stable Diffusion 3 (SD3)"
    hub_tag = "sd3"
    pipelines = (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
        "StableDiffusion3ControlNetPipeline",
    )
    pipeline_class = "StableDiffusion3Pipeline"
    controlnet_pipeline_class = "StableDiffusion3ControlNetPipeline"
    controlnet_class = "SD3ControlNetModel"
    new_layers = ("pos_embed_input", "controlnet_blocks")  # condition embedder, zero linears
    cache_parts = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    text_features = (TEXT, POOLED)
    text_encoder_classes = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
    transformer_class = "SD3Transformer2DModel"
    default_max_sequence_length = 256  # the SD3 pipelines' default
    default_layers = 12  # upstream's from_transformer default (SD3.5-medium has 24 joint blocks)

    def objective(self, objective: Objective) -> Objective:
        return replace(objective, precondition=True)  # upstream's --precondition_outputs 1

    def tiny_components(self, tokenizer, vocab_size: int, text_encoder, vae, resolution: int) -> BaseComponents:
        from .. import tiny

        return BaseComponents(
            family=self.name,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            tokenizer_2=tokenizer,
            text_encoder_2=tiny.build_text_encoder_2(vocab_size).eval().requires_grad_(False),
            tokenizer_3=tokenizer,
            text_encoder_3=tiny.build_t5(vocab_size).eval().requires_grad_(False),
            vae=vae,
            denoiser=tiny.build_sd3_transformer(resolution),
            noise_scheduler=tiny.build_flow_scheduler(dynamic_shifting=False),
            max_sequence_length=tiny.MAX_TOKENS,
        )

    def tiny_text_encoder(self, vocab_size: int):
        from .. import tiny

        return tiny.build_text_encoder(vocab_size, projection=True)  # SD3's CLIP-L has its projection

    def encode_with(self, pipe, captions, device, max_sequence_length):
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions,
            captions,
            captions,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return {TEXT: embeds, POOLED: pooled}

    def make_controlnet(self, base: BaseComponents, t: TrainCfg):
        from diffusers import SD3ControlNetModel

        if t.controlnet_single_layers is not None:
            raise ValueError("train.controlnet_single_layers: expected null for SD3 (its blocks are all joint blocks)")
        # the base's last block updates the image stream alone: a ControlNet copies the ones before it
        most = base.denoiser.config.num_layers - 1
        layers = t.controlnet_layers or min(self.default_layers, most)
        if layers > most:
            raise ValueError(f"train.controlnet_layers: {layers}, but the base has {most + 1} joint blocks (at most {most})")
        # extra channels 0: the default 1 gives "expected 17 channels, got 16" (https://github.com/huggingface/diffusers/issues/10055)
        model = SD3ControlNetModel.from_transformer(base.denoiser, num_layers=layers, num_extra_conditioning_channels=0)
        # trained with the real pooled projections and the VAE's shift (as upstream trains): the
        # pipeline reads this to give it the same (its default, for InstantX's models, is zeros, no shift)
        model.register_to_config(force_zeros_for_pooled_projection=False)
        if t.hint_init == "random":
            model.pos_embed_input.proj.reset_parameters()
        elif t.hint_init == "copy":  # the condition's latents patch-embedded as the base embeds the image's
            model.pos_embed_input.proj.load_state_dict(base.denoiser.pos_embed.proj.state_dict())
        return model

    def residuals(self, controlnet, noised, text, batch, control, device):
        return controlnet(
            hidden_states=noised.noisy,
            timestep=noised.timesteps.to(device),
            encoder_hidden_states=text[TEXT].to(device),
            pooled_projections=text[POOLED].to(device),
            controlnet_cond=control,
            return_dict=False,
        )[0]

    def predict(self, denoiser, noised, text, batch, residuals, dtype, device):
        return denoiser(
            hidden_states=noised.noisy.to(dtype),
            timestep=noised.timesteps.to(device),
            encoder_hidden_states=text[TEXT].to(device, dtype),
            pooled_projections=text[POOLED].to(device, dtype),
            block_controlnet_hidden_states=None if residuals is None else [r.to(dtype) for r in residuals],
            return_dict=False,
        )[0]
