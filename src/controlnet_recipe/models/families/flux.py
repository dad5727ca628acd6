"""FLUX.1: a 12B rectified-flow transformer (19 double-stream and 38 single-stream blocks). Captions
enter as T5-XXL's hidden states (up to 512 tokens) and CLIP-L's pooled embedding; FLUX.1-dev also
takes a guidance embedding. Latents are 16-channel, shifted and scaled, and packed into 2x2 patches
with their position ids; the ControlNet (``FluxControlNetModel.from_transformer``) copies the
embedders and the leading blocks and takes the condition as packed latents through a
zero-initialised ``controlnet_x_embedder``, as upstream's train_controlnet_flux.py does."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .family import POOLED, TEXT, BaseComponents
from .flow import FlowFamily
from .measured import MeasuredModels, StepSpec, build, encode_control, layerwise_fp8

if TYPE_CHECKING:
    from ...core.config import TrainCfg
    from ...objectives.diffusion import Noised

TRAIN_GUIDANCE = 3.5  # upstream's --guidance_scale: the guidance embedding's value while training (FLUX.1-dev)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 x w/2, 4C), as ``FluxPipeline._pack_latents``."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack`, for latents of height ``h`` and width ``w``."""
    n, _, c4 = packed.shape
    return packed.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)


class Flux(FlowFamily):
    name = "flux"
    size_multiple = 16  # image sides divide by this: the VAE 8x, 2x2 packing
    title = "FLUX.1"
    hub_tag = "flux"
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlNetPipeline")
    pipeline_class = "FluxPipeline"
    controlnet_pipeline_class = "FluxControlNetPipeline"
    controlnet_class = "FluxControlNetModel"
    new_layers = ("controlnet_x_embedder", "controlnet_blocks", "controlnet_single_blocks")  # condition embedder, zero linears
    cache_parts = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    text_features = (TEXT, POOLED)
    text_encoder_classes = ("CLIPTextModel", "T5EncoderModel")
    transformer_class = "FluxTransformer2DModel"
    default_max_sequence_length = 512
    measured = property(lambda self: FluxMeasured)  # the planner's full-size models (defined below)
    describe_layers = staticmethod(lambda blocks, single: f"{blocks} double-stream + {single} single-stream blocks")
    default_layers = (4, 0)  # double-stream, single-stream: maintainers' advice (4/10 runs out of 80 GB)

    def tiny_components(
        self, tokenizer, vocab_size: int, text_encoder, vae, resolution: int, layers_per_block: int = 1
    ) -> BaseComponents:
        from .. import tiny

        return BaseComponents(
            family=self.name,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            tokenizer_2=tokenizer,
            text_encoder_2=tiny.build_t5(vocab_size).eval().requires_grad_(False),
            vae=vae,
            denoiser=tiny.build_flux_transformer(),
            noise_scheduler=tiny.build_flow_scheduler(dynamic_shifting=True),
            max_sequence_length=tiny.MAX_TOKENS,
        )

    def encode_with(self, pipe, captions, device, max_sequence_length):
        embeds, pooled, _ = pipe.encode_prompt(
            captions, prompt_2=captions, device=device, max_sequence_length=max_sequence_length
        )
        return {TEXT: embeds, POOLED: pooled}

    def noise(self, scheduler, x0, generator, objective):
        """Flow matching on the packed latents, as upstream draws its noise (in the packed layout),
        returned in the latents' own layout."""
        from ...objectives.flow_matching import flow_inputs

        h, w = x0.shape[-2:]
        n = flow_inputs(scheduler, pack(x0), generator, objective)
        return n._replace(noisy=unpack(n.noisy, h, w), target=unpack(n.target, h, w))

    def noise_and_control(self, scheduler, x0, batch, latents, generator, objective, device):
        """Upstream's order for Flux: the condition's latents, then the noise and timesteps."""
        control = self.control_input(batch, latents, generator, device)
        return self.noise(scheduler, x0, generator, objective), control

    def make_controlnet(self, base: BaseComponents, t: TrainCfg):
        from diffusers import FluxControlNetModel

        cfg = base.denoiser.config
        # the defaults, or the base's own counts where it has fewer blocks (the tiny base)
        double = t.controlnet_layers if t.controlnet_layers is not None else min(self.default_layers[0], cfg.num_layers)
        single = t.controlnet_single_layers if t.controlnet_single_layers is not None else self.default_layers[1]
        if double > cfg.num_layers or single > cfg.num_single_layers:
            raise ValueError(
                f"train.controlnet_layers / controlnet_single_layers: {double} / {single}, but the base has "
                f"{cfg.num_layers} double-stream and {cfg.num_single_layers} single-stream blocks"
            )
        model = FluxControlNetModel.from_transformer(
            base.denoiser,
            num_layers=double,
            num_single_layers=single,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
        )
        if t.hint_init == "random":  # the condition's embedder, zero in upstream's init
            model.controlnet_x_embedder.reset_parameters()
        elif t.hint_init == "copy":  # the condition's latents embedded as the base embeds the image's
            model.controlnet_x_embedder.load_state_dict(base.denoiser.x_embedder.state_dict())
        return model

    def transformer_inputs(self, denoiser, noised: Noised, text: dict, device, dtype) -> dict:
        """The packed latents, ids, timestep and guidance the transformer (and its ControlNet) take
        (as upstream's script)."""
        import torch

        noisy = noised.noisy
        n, _, h, w = noisy.shape
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        embeds = text[TEXT].to(device)
        guidance = None
        if getattr(denoiser, "module", denoiser).config.guidance_embeds:  # a DDP or DeepSpeed wrapper holds the model
            guidance = torch.full((n,), TRAIN_GUIDANCE, device=device, dtype=dtype)
        return dict(
            hidden_states=pack(noisy),
            timestep=noised.timesteps.to(device) / 1000,
            guidance=guidance,
            pooled_projections=text[POOLED].to(device),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=img_ids.reshape(-1, 3).to(device, dtype),
        )

    def residuals(self, controlnet, noised, text, batch, control, device):
        inputs = self.transformer_inputs(controlnet, noised, text, device, next(controlnet.parameters()).dtype)
        return controlnet(controlnet_cond=pack(control), return_dict=False, **inputs)

    def predict(self, denoiser, noised, text, batch, residuals, dtype, device):
        inputs = self.transformer_inputs(denoiser, noised, text, device, dtype)
        for k in ("hidden_states", "pooled_projections", "encoder_hidden_states"):  # the timestep stays fp32, as upstream's
            inputs[k] = inputs[k].to(dtype)
        blocks, single = residuals if residuals is not None else (None, None)
        out = denoiser(
            controlnet_block_samples=None if blocks is None else [b.to(dtype) for b in blocks],
            controlnet_single_block_samples=None if single is None else [s.to(dtype) for s in single],
            return_dict=False,
            **inputs,
        )[0]
        return unpack(out, *noised.noisy.shape[-2:])

    def sampling_kwargs(self, base, n, guidance_scale, conditions=None, scale=1.0):
        kw = super().sampling_kwargs(base, n, guidance_scale, conditions, scale)
        if not base.denoiser.config.guidance_embeds:  # no distilled guidance (the tiny base, schnell): true CFG
            kw.update(true_cfg_scale=guidance_scale, negative_prompt=[""] * n)
        return kw


class FluxMeasured(MeasuredModels):
    """FLUX.1: FluxTransformer2DModel + FluxControlNetModel.from_transformer, latents packed in
    2x2 patches (upstream's train_controlnet_flux.py; T5 features precomputed, text encoders off
    the GPU while training)."""

    @property
    def TEXT_TOKENS(self) -> int:  # T5's max_sequence_length: upstream's script's 512 unless the recipe says
        return self.spec.max_sequence_length or Flux.default_max_sequence_length

    def __init__(self, spec: StepSpec, validation_models: bool = True) -> None:
        super().__init__(spec)
        from diffusers import AutoencoderKL, FluxControlNetModel, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from ..architectures import folder_of

        folder = folder_of(spec.arch)
        cfg = FluxTransformer2DModel.load_config(folder / "transformer")
        self.transformer = build(lambda: FluxTransformer2DModel.from_config(cfg), self.dtype)
        self.transformer.requires_grad_(False).eval()
        double, single = spec.controlnet_layers or Flux.default_layers
        cn_dtype = self.dtype if spec.deepspeed else torch.float32
        self.controlnet = build(
            lambda: FluxControlNetModel.from_transformer(
                self.transformer,
                num_layers=double,
                num_single_layers=single,
                attention_head_dim=cfg["attention_head_dim"],
                num_attention_heads=cfg["num_attention_heads"],
            ),
            cn_dtype,
        )
        self.base = self.transformer
        if spec.frozen_fp8:  # after from_transformer: the ControlNet copies the base's weights first
            layerwise_fp8(self.transformer, "transformer", self.dtype)
        self.vae = build(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")), self.dtype)
        self.vae.requires_grad_(False).eval()
        self.frozen["transformer"] = self.transformer
        if spec.per_step_encoding:
            self.frozen["vae"] = self.vae
        else:
            self.for_validation["vae"] = self.vae
        self.latent_channels = self.vae.config.latent_channels
        self.joint_dim = cfg["joint_attention_dim"]
        self.pooled_dim = cfg["pooled_projection_dim"]
        if not validation_models:  # the GPU check's training step: T5 would only take memory
            return
        clip = build(lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")), self.dtype)
        t5 = build(lambda: T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_2")), self.dtype)
        for m in (clip, t5):
            m.requires_grad_(False).eval()
        self.for_validation.update({"text_encoder": clip, "text_encoder_2": t5})

    def _inputs(self, b: int, size: tuple[int, int] | None = None) -> dict:
        """The transformer's other inputs for ``b`` images of ``size`` (width, height; None: the step's)."""
        w, h = size or self.spec.step_size
        tokens = (h // 16) * (w // 16)  # 8x VAE, then 2x2 patches
        return dict(
            encoder_hidden_states=torch.randn(b, self.TEXT_TOKENS, self.joint_dim).to(self.dtype),
            pooled_projections=torch.randn(b, self.pooled_dim).to(self.dtype),
            timestep=torch.rand(b).to(self.dtype),
            guidance=torch.full((b,), 3.5).to(self.dtype),
            img_ids=torch.zeros(tokens, 3).to(self.dtype),
            txt_ids=torch.zeros(self.TEXT_TOKENS, 3).to(self.dtype),
        )

    def _packed(self, b: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``b`` packed latents of images of ``size`` (width, height; None: the step's): (b, h/16 x w/16, 4C)."""
        w, h = size or self.spec.step_size
        if self.spec.per_step_encoding:
            return pack(self.vae.encode(torch.randn(b, 3, h, w).to(self.dtype)).latent_dist.sample())
        return torch.randn(b, (h // 16) * (w // 16), 4 * self.latent_channels).to(self.dtype)

    def adapter_inputs(self, b: int, size: tuple[int, int]):
        from ...objectives.diffusion import Noised

        w, h = size
        x0, cond = (unpack(self._packed(b, size), h // 16 * 2, w // 16 * 2) for _ in range(2))
        noise = torch.randn_like(x0)
        kw = self._inputs(b, size)
        text = {TEXT: kw["encoder_hidden_states"], POOLED: kw["pooled_projections"]}
        return Noised(0.5 * x0 + 0.5 * noise, kw["timestep"].float() * 1000, noise - x0, None), text, {}, cond

    def training_loss(self) -> torch.Tensor:
        b = self.spec.micro_batch
        x0, cond = self._packed(b), self._packed(b)
        noise = torch.randn_like(x0)
        noisy = 0.5 * x0 + 0.5 * noise
        kw = self._inputs(b)
        with self.autocast():
            blocks, singles = self.controlnet(hidden_states=noisy, controlnet_cond=cond, return_dict=False, **kw)
            pred = self.transformer(
                hidden_states=noisy,
                controlnet_block_samples=[s.to(self.dtype) for s in blocks] if blocks is not None else None,
                controlnet_single_block_samples=[s.to(self.dtype) for s in singles] if singles is not None else None,
                return_dict=False,
                **kw,
            )[0]
        return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())

    def _controlnet_forward(self, n: int, size: tuple[int, int]) -> None:
        w, h = size
        with self.autocast():
            cond = pack(encode_control(self.vae, n, size, self.dtype, self.spec.vae_slicing))
        x = torch.randn(n, (h // 16) * (w // 16), 4 * self.latent_channels).to(self.dtype)
        kw = self._inputs(n, size)
        with self.autocast():
            blocks, singles = self.controlnet(hidden_states=x, controlnet_cond=cond, return_dict=False, **kw)
            self.transformer(
                hidden_states=x, controlnet_block_samples=blocks, controlnet_single_block_samples=singles, return_dict=False, **kw
            )

    @torch.no_grad()
    def validate(self) -> None:
        """The prompt through CLIP and T5 (``validation_text_encoders``; else its embeddings, encoded
        on the CPU, come to the GPU: ``_inputs``' tensors), the control image through the VAE's
        encoder, one denoising step (guidance is an input: no doubled batch), then the VAE
        decoding, one image at a time with ``vae_slicing``; all under autocast, as the recipe's
        validation runs the pipeline."""
        n, size = self.spec.validation_images, self.spec.validation_size
        if self.spec.validation_text_encoders:
            self.for_validation["text_encoder"](torch.randint(0, 1000, (n, 77)))
            self.for_validation["text_encoder_2"](torch.randint(0, 1000, (n, self.TEXT_TOKENS)))
        if self.adapter is not None:
            self.adapter_forward(n, size)
        else:
            self._controlnet_forward(n, size)
        lat_h, lat_w = size[1] // 16 * 2, size[0] // 16 * 2
        with self.autocast():
            for _ in range(n if self.spec.vae_slicing else 1):  # slicing: one image at a time
                latents = torch.randn(1 if self.spec.vae_slicing else n, self.latent_channels, lat_h, lat_w)
                self.vae.decode(latents.to(self.dtype))
