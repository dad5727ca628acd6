"""FLUX.1: a 12B rectified-flow transformer (19 double-stream and 38 single-stream blocks). Captions
enter as T5-XXL's hidden states (up to 512 tokens) and CLIP-L's pooled embedding; FLUX.1-dev also
takes a guidance embedding. Latents are 16-channel, shifted and scaled, and packed into 2x2 patches
with their position ids; the ControlNet (``FluxControlNetModel.from_transformer``) copies the
embedders and the leading blocks and takes the condition as packed latents through a
zero-initialised ``controlnet_x_embedder``, as upstream's train_controlnet_flux.py does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .family import POOLED, TEXT, BaseComponents
from .flow import FlowFamily

if TYPE_CHECKING:
    import torch

    from ...config import TrainCfg
    from ...diffusion import Noised

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
    default_layers = (4, 0)  # double-stream, single-stream: maintainers' advice (4/10 runs out of 80 GB)

    def tiny_components(self, tokenizer, vocab_size: int, text_encoder, vae, resolution: int) -> BaseComponents:
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
        from ...flow_matching import flow_inputs

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

    def _inputs(self, denoiser, noised: Noised, text: dict, device, dtype) -> dict:
        """The packed latents, ids, timestep and guidance both models take (as upstream's script)."""
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
        inputs = self._inputs(controlnet, noised, text, device, next(controlnet.parameters()).dtype)
        return controlnet(controlnet_cond=pack(control), return_dict=False, **inputs)

    def predict(self, denoiser, noised, text, batch, residuals, dtype, device):
        inputs = self._inputs(denoiser, noised, text, device, dtype)
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
