"""Stable Diffusion 3 / 3.5: an MMDiT rectified-flow transformer. Captions enter as CLIP-L's and
CLIP-G's penultimate hidden states (concatenated, padded to T5's width) followed by T5-XXL's, and
the two CLIPs' pooled projections; latents are 16-channel, shifted and scaled. The ControlNet
(``SD3ControlNetModel.from_transformer``) copies the embedders and the leading joint blocks and
takes the condition as latents through a zero-initialised patch embedding. Upstream's
train_controlnet_sd3.py preconditions the output (x0 = output x (-sigma) + x_t, target x0)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .family import POOLED, TEXT, BaseComponents
from .flow import FlowFamily
from .measured import MeasuredModels, StepSpec, buffers_to, build, encode_control, layerwise_fp8

if TYPE_CHECKING:
    from ...core.config import TrainCfg
    from ...objectives.diffusion import Objective


class StableDiffusion3(FlowFamily):
    name = "sd3"
    size_multiple = 16  # image sides divide by this: the VAE 8x, 2x2 patches
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
    measured = property(lambda self: SD3Measured)  # the planner's full-size models (defined below)
    default_layers = (12, 0)  # joint blocks: upstream's from_transformer default (SD3.5-medium has 24); no single-stream

    def objective(self, objective: Objective) -> Objective:
        return replace(objective, precondition=True)  # upstream's --precondition_outputs 1

    def tiny_components(
        self, tokenizer, vocab_size: int, text_encoder, vae, resolution: int, layers_per_block: int = 1
    ) -> BaseComponents:
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
        layers = t.controlnet_layers or min(self.default_layers[0], most)
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


class SD3Measured(MeasuredModels):
    """SD3/SD3.5: SD3Transformer2DModel + SD3ControlNetModel.from_transformer (``controlnet_layers`` joint
    blocks, no extra conditioning channels: the control image enters as VAE latents). Latents are
    not packed; the timestep is the scheduler's (0-1000). The prompt: CLIP-L and CLIP-G's 77 tokens
    then T5's, all precomputed while training."""

    CLIP_TOKENS = 77

    def __init__(self, spec: StepSpec, validation_models: bool = True) -> None:
        super().__init__(spec)
        from diffusers import AutoencoderKL, SD3ControlNetModel, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        from ..architectures import folder_of

        folder = folder_of(spec.arch)
        cfg = SD3Transformer2DModel.load_config(folder / "transformer")
        self.transformer = build(lambda: SD3Transformer2DModel.from_config(cfg), self.dtype)
        self.transformer.requires_grad_(False).eval()
        buffers_to(self.transformer, self.dtype)  # from_pretrained(torch_dtype=...) casts pos_embed's too
        cn_dtype = self.dtype if spec.deepspeed else torch.float32
        self.controlnet = build(
            lambda: SD3ControlNetModel.from_transformer(
                self.transformer,
                num_layers=(spec.controlnet_layers or StableDiffusion3.default_layers)[0],
                num_extra_conditioning_channels=0,
            ),
            cn_dtype,
        )
        self.base = self.transformer
        if spec.frozen_fp8:  # after from_transformer: the ControlNet copies the base's weights first
            layerwise_fp8(self.transformer, "transformer", self.dtype)
        vae_cfg = AutoencoderKL.load_config(folder / "vae")
        self.vae = build(lambda: AutoencoderKL.from_config(vae_cfg), self.dtype)
        self.vae.requires_grad_(False).eval()
        self.down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.frozen["transformer"] = self.transformer
        if spec.per_step_encoding:
            self.frozen["vae"] = self.vae
        else:
            self.for_validation["vae"] = self.vae
        self.latent_channels = vae_cfg["latent_channels"]
        self.joint_dim = cfg["joint_attention_dim"]
        self.pooled_dim = cfg["pooled_projection_dim"]
        if not validation_models:
            return
        encoders = {
            "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
            "text_encoder_3": lambda: T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_3")),
        }
        for name, make in encoders.items():
            if (folder / name / "config.json").is_file():
                self.for_validation[name] = build(make, self.dtype).requires_grad_(False).eval()

    @property
    def text_tokens(self) -> int:
        return self.CLIP_TOKENS + (self.spec.max_sequence_length or StableDiffusion3.default_max_sequence_length)

    def _inputs(self, b: int) -> dict:
        return dict(
            encoder_hidden_states=torch.randn(b, self.text_tokens, self.joint_dim).to(self.dtype),
            pooled_projections=torch.randn(b, self.pooled_dim).to(self.dtype),
            timestep=(torch.rand(b) * 1000).to(self.dtype),
        )

    def _latents(self, b: int, size: tuple[int, int]) -> torch.Tensor:
        """``b`` latents of images of ``size`` (width, height): (b, C, h/8, w/8)."""
        w, h = size
        if self.spec.per_step_encoding:
            return self.vae.encode(torch.randn(b, 3, h, w).to(self.dtype)).latent_dist.sample()
        return torch.randn(b, self.latent_channels, h // self.down, w // self.down).to(self.dtype)

    def adapter_inputs(self, b: int, size: tuple[int, int]):
        from ...objectives.diffusion import Noised
        from .family import POOLED, TEXT

        x0, cond = self._latents(b, size), self._latents(b, size)
        noise = torch.randn_like(x0)
        kw = self._inputs(b)
        text = {TEXT: kw["encoder_hidden_states"], POOLED: kw["pooled_projections"]}
        return Noised(0.5 * x0 + 0.5 * noise, kw["timestep"].float(), noise - x0, None), text, {}, cond

    def training_loss(self) -> torch.Tensor:
        b, size = self.spec.micro_batch, self.spec.step_size
        x0, cond = self._latents(b, size), self._latents(b, size)
        noise = torch.randn_like(x0)
        noisy = 0.5 * x0 + 0.5 * noise
        kw = self._inputs(b)
        with self.autocast():
            (blocks,) = self.controlnet(hidden_states=noisy, controlnet_cond=cond, return_dict=False, **kw)
            pred = self.transformer(
                hidden_states=noisy,
                block_controlnet_hidden_states=[s.to(self.dtype) for s in blocks],
                return_dict=False,
                **kw,
            )[0]
        return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())

    def _controlnet_forward(self, n: int, size: tuple[int, int]) -> None:
        w, h = size
        with self.autocast():  # the control image, doubled for guidance before the pipeline encodes it
            cond = encode_control(self.vae, 2 * n, size, self.dtype, self.spec.vae_slicing)
        x = torch.randn(2 * n, self.latent_channels, h // self.down, w // self.down).to(self.dtype)
        kw = self._inputs(2 * n)
        with self.autocast():
            (blocks,) = self.controlnet(hidden_states=x, controlnet_cond=cond, return_dict=False, **kw)
            self.transformer(hidden_states=x, block_controlnet_hidden_states=blocks, return_dict=False, **kw)

    @torch.no_grad()
    def validate(self) -> None:
        """The prompt and the negative one through the three encoders (``validation_text_encoders``;
        else their embeddings come to the GPU), the control image through the VAE's encoder, one
        denoising step with classifier-free guidance (a doubled batch), then the VAE decoding."""
        n, size = self.spec.validation_images, self.spec.validation_size
        t5 = self.spec.max_sequence_length or StableDiffusion3.default_max_sequence_length
        if self.spec.validation_text_encoders:
            for name, enc in self.for_validation.items():
                if name.startswith("text_encoder"):
                    enc(torch.randint(0, 1000, (2 * n, t5 if name == "text_encoder_3" else self.CLIP_TOKENS)))
        lat_h, lat_w = size[1] // self.down, size[0] // self.down
        if self.adapter is not None:
            self.adapter_forward(2 * n, size)
        else:
            self._controlnet_forward(n, size)
        with self.autocast():
            for _ in range(n if self.spec.vae_slicing else 1):
                self.vae.decode(torch.randn(1 if self.spec.vae_slicing else n, self.latent_channels, lat_h, lat_w).to(self.dtype))
