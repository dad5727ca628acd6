"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, its last hidden states condition the UNet.
Families built on the same UNet and pipeline layout (SDXL) extend this one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .family import TEXT, BaseComponents, Family, tokenize
from .measured import MeasuredModels, StepSpec, build, layerwise_fp8

if TYPE_CHECKING:
    from ...core.config import TrainCfg
    from ...objectives.diffusion import Noised, Objective

DEFAULT_HINT_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNet hint encoder: 3 downsamplings (8x)


def hint_channels(vae_config) -> tuple[int, ...]:
    """The condition's embedder's widths: it downsamples as much as the VAE does."""
    return DEFAULT_HINT_CHANNELS[: len(vae_config["block_out_channels"])]


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
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels(vae_config))
    if hint_init == "random":
        model.controlnet_cond_embedding.conv_out.reset_parameters()
    return model


class StableDiffusion(Family):
    name = "sd"
    size_multiple = 64  # image sides divide by this: the VAE 8x, the UNet 8x
    measured = property(lambda self: UNetMeasured)  # the planner's full-size models (defined below)
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

    def tiny_components(
        self, tokenizer, vocab_size: int, text_encoder, vae, resolution: int, layers_per_block: int = 1
    ) -> BaseComponents:
        from .. import tiny

        return BaseComponents(
            family=self.name,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            denoiser=tiny.build_unet(resolution, layers_per_block=layers_per_block),
            noise_scheduler=tiny.build_scheduler(),
        )

    def tiny_objective(self, snr_gamma: float | None) -> Objective:
        from ...objectives.diffusion import Objective

        return Objective(weighting="none" if snr_gamma is None else "min_snr", snr_gamma=snr_gamma or 5.0)

    def noise(self, scheduler, x0, generator, objective: Objective) -> Noised:
        from ...objectives.diffusion import ddpm_inputs

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
        extra = {}
        if residuals is not None:
            down, mid = residuals
            extra = dict(down_block_additional_residuals=[d.to(dtype) for d in down], mid_block_additional_residual=mid.to(dtype))
        return self.denoise(denoiser, noised, text, batch, extra, dtype, device)

    def denoise(self, denoiser, noised: Noised, text: dict, batch: dict, extra: dict, dtype, device):
        """The frozen UNet's output, ``extra`` among its arguments (what a kind of control adds)."""
        added = self.added_cond_kwargs(text, batch, device)
        if added is not None:
            added = {**added, "text_embeds": added["text_embeds"].to(dtype)}
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

    def pipeline_parts(self, base: BaseComponents, scheduler=None) -> dict:
        import diffusers

        return dict(
            vae=base.vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            unet=base.denoiser,
            scheduler=scheduler or diffusers.UniPCMultistepScheduler.from_config(base.noise_scheduler.config),
            **self.more_pipeline_parts(base),
        )

    def more_pipeline_parts(self, base: BaseComponents) -> dict:
        return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_vae(name_or_path: str, revision: str | None, vae: str | None):
    """The base's own VAE, or ``vae`` (a hub id or folder holding an AutoencoderKL) in its place."""
    from diffusers import AutoencoderKL

    if vae:
        return AutoencoderKL.from_pretrained(vae)
    return AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", revision=revision)


class UNetMeasured(MeasuredModels):
    """SD 1.x/2.x and SDXL (and the demo's tiny base): UNet + ControlNetModel.from_unet."""

    def __init__(self, spec: StepSpec) -> None:
        super().__init__(spec)
        from diffusers import ControlNetModel

        from .. import architectures, tiny

        res = spec.resolution
        if spec.arch == "tiny":
            parts = {
                "unet": lambda: tiny.build_unet(res),
                "vae": lambda: tiny.build_vae(res),
                "text_encoder": lambda: tiny.build_text_encoder(1000),
            }
            self.tokens, self.text_dim = tiny.MAX_TOKENS, tiny.TEXT_DIM
        else:
            names = ["unet", "vae", "text_encoder"] + (
                ["text_encoder_2"] if architectures.has(spec.arch, "text_encoder_2") else []
            )
            parts = {n: (lambda n=n: architectures.build(spec.arch, (n,))[n]) for n in names}
            self.tokens = 77
        unet = build(parts["unet"], self.dtype)
        unet.requires_grad_(False).eval()
        if spec.arch != "tiny":
            self.text_dim = unet.config.cross_attention_dim
        vae_cfg = build(parts["vae"], torch.float32).config if spec.arch == "tiny" else architectures.vae_config(spec.arch)
        self.down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.latent_channels = vae_cfg["latent_channels"]
        cn_dtype = self.dtype if spec.deepspeed else torch.float32
        self.controlnet = build(
            lambda: ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels(vae_cfg)),
            cn_dtype,
        )
        self.unet = self.base = unet
        self.frozen["unet"] = unet
        if spec.frozen_fp8:  # after from_unet: the ControlNet copies the base's weights first
            layerwise_fp8(unet, "unet", self.dtype)
        self.sdxl = unet.config.get("addition_embed_type") == "text_time"
        # upstream's SDXL script keeps its VAE in fp32 unless given another (the fp16-fixed) one
        vae_dtype = torch.float32 if self.sdxl and spec.per_step_encoding else self.dtype
        encoders = [n for n in parts if n.startswith("text_encoder")]
        vae = build(parts["vae"], vae_dtype)
        text = {n: build(parts[n], self.dtype) for n in encoders}
        for m in (vae, *text.values()):
            m.requires_grad_(False).eval()
        self.vae = vae
        self.text_encoder = text.get("text_encoder")
        # the SDXL pipeline's decoding upcasts a force_upcast VAE to fp32 (its weights too)
        upcast = spec.vae_force_upcast if spec.vae_force_upcast is not None else bool(vae.config.get("force_upcast"))
        self.upcast_vae = None
        if self.sdxl and upcast and vae_dtype != torch.float32:
            self.upcast_vae = build(parts["vae"], torch.float32).requires_grad_(False).eval()
            self.for_validation["vae upcast to fp32"] = self.upcast_vae
        if spec.per_step_encoding:  # upstream: VAE and text encoders on the GPU throughout
            # (SDXL's script runs its encoders once, over the dataset, and leaves them there)
            self.frozen.update({"vae": vae, **text})
        else:
            self.for_validation.update({"vae": vae, **text})

    def set_switches(self) -> None:
        """Checkpointing, and the attention: ``math`` as diffusers computed it before PyTorch 2's
        SDPA (scores materialised), else SDPA."""
        super().set_switches()
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        proc = AttnProcessor if self.spec.attention == "math" else AttnProcessor2_0
        for model in (self.controlnet, self.base):
            if hasattr(model, "set_attn_processor"):  # a T2I-Adapter has no attention
                model.set_attn_processor(proc())

    def _text(self, b: int) -> tuple[torch.Tensor, dict | None]:
        added = None
        if self.sdxl:
            pooled = self.unet.config.projection_class_embeddings_input_dim - 6 * self.unet.config.addition_time_embed_dim
            added = {"text_embeds": torch.randn(b, pooled), "time_ids": torch.randn(b, 6)}
        return torch.randn(b, self.tokens, self.text_dim), added

    def adapter_inputs(self, b: int, size: tuple[int, int]):
        from ...objectives.diffusion import Noised
        from .family import POOLED, TEXT
        from .sdxl import TIME_IDS

        w, h = size
        x0 = torch.randn(b, self.latent_channels, h // self.down, w // self.down)
        noise = torch.randn_like(x0)
        enc, added = self._text(b)
        text, batch = {TEXT: enc}, {}
        if added is not None:
            text[POOLED], batch[TIME_IDS] = added["text_embeds"], added["time_ids"]
        return Noised(x0 + noise, torch.randint(0, 1000, (b,)), noise, None), text, batch, torch.rand(b, 3, h, w)

    def training_loss(self) -> torch.Tensor:
        b, (w, h) = self.spec.micro_batch, self.spec.step_size
        hint = torch.rand(b, 3, h, w)
        if self.spec.per_step_encoding:
            pixels = torch.randn(b, 3, h, w).to(next(self.vae.parameters()).dtype)
            x0 = self.vae.encode(pixels).latent_dist.sample().float()
            if not self.sdxl:  # SDXL: the embeddings were computed once, before training
                enc = self.text_encoder(torch.randint(0, 1000, (b, self.tokens)))[0].float()
                _, added = self._text(b)
            else:
                enc, added = self._text(b)
        else:
            x0 = torch.randn(b, self.latent_channels, h // self.down, w // self.down)
            enc, added = self._text(b)
        noise = torch.randn_like(x0)
        noisy = x0 + noise
        ts = torch.randint(0, 1000, (b,))
        with self.autocast():
            down, mid = self.controlnet(
                noisy, ts, encoder_hidden_states=enc, controlnet_cond=hint, added_cond_kwargs=added, return_dict=False
            )
            pred = self.unet(
                noisy.to(self.dtype),
                ts,
                encoder_hidden_states=enc.to(self.dtype),
                added_cond_kwargs=None if added is None else {k: v.to(self.dtype) for k, v in added.items()},
                down_block_additional_residuals=[d.to(self.dtype) for d in down],
                mid_block_additional_residual=mid.to(self.dtype),
            ).sample
        return torch.nn.functional.mse_loss(pred.float(), noise)

    def _controlnet_forward(self, n: int, size: tuple[int, int]) -> None:
        w, h = size
        enc, added = self._text(2 * n)
        x = torch.randn(2 * n, self.latent_channels, h // self.down, w // self.down).to(self.dtype)
        with self.autocast():
            down, mid = self.controlnet(
                x,
                torch.tensor(500),
                encoder_hidden_states=enc.to(self.dtype),
                controlnet_cond=torch.rand(2 * n, 3, h, w).to(self.dtype),
                added_cond_kwargs=added,
                return_dict=False,
            )
            self.unet(
                x,
                torch.tensor(500),
                encoder_hidden_states=enc.to(self.dtype),
                added_cond_kwargs=added,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            )

    @torch.no_grad()
    def validate(self) -> None:
        """One denoising step of the pipeline (classifier-free guidance doubles the batch), then
        the VAE decoding the images."""
        n, size = self.spec.validation_images, self.spec.validation_size
        lat_h, lat_w = size[1] // self.down, size[0] // self.down
        for name, enc in self.for_validation.items():
            if name.startswith("text_encoder"):
                enc(torch.randint(0, 1000, (2 * n, self.tokens)))
        if self.adapter is not None:
            self.adapter_forward(2 * n, size)
        else:
            self._controlnet_forward(n, size)
        vae = self.upcast_vae or self.vae
        vae_dtype = next(vae.parameters()).dtype
        with self.autocast():  # the recipe's validation runs the whole pipeline under autocast
            for _ in range(n if self.spec.vae_slicing else 1):  # slicing: one image at a time
                vae.decode(torch.randn(1 if self.spec.vae_slicing else n, self.latent_channels, lat_h, lat_w).to(vae_dtype))
