"""ControlNet-XS (diffusers' ``ControlNetXSAdapter``; Zavadski et al., 2023): a control network a
fraction of the UNet's width (``size_ratio``), which exchanges features with the frozen UNet in
both directions at every block instead of adding its outputs once. diffusers runs the two fused
(``UNetControlNetXSModel``), so training trains the fused model's control parts and the base's parts
stay frozen; what is saved is the adapter alone, which ``StableDiffusion(XL)ControlNetXSPipeline``
fuses with the base's UNet again. diffusers' XS blocks take two resnets per down block, as SD and
SDXL have (the tiny base: ``base.tiny.layers_per_block: 2``)."""

from __future__ import annotations

import re

from ..core.config import ConfigError
from .adapter import Adapter

DEFAULT_SIZE_RATIO = 0.25  # the control network's widths / the UNet's (about the paper's 55M on SD 1.5)
LAYERS_PER_BLOCK = 2  # what diffusers' ControlNet-XS blocks take (SD's and SDXL's UNets)
# the fused model's control parts, as ControlNetXSAdapter names them; the rest is the base's
RENAMES = (
    (r"^controlnet_cond_embedding\.", "controlnet_cond_embedding."),
    (r"^control_to_base_for_conv_in\.", "control_to_base_for_conv_in."),
    (r"^ctrl_conv_in\.", "conv_in."),
    (r"^ctrl_time_embedding\.", "time_embedding."),
    (r"^down_blocks\.(\d+)\.ctrl_resnets\.", r"down_blocks.\1.resnets."),
    (r"^down_blocks\.(\d+)\.ctrl_attentions\.", r"down_blocks.\1.attentions."),
    (r"^down_blocks\.(\d+)\.ctrl_downsamplers\.", r"down_blocks.\1.downsamplers."),
    (r"^down_blocks\.(\d+)\.(base_to_ctrl|ctrl_to_base)\.", r"down_blocks.\1.\2."),
    (r"^mid_block\.ctrl_midblock\.", "mid_block.midblock."),
    (r"^mid_block\.(base_to_ctrl|ctrl_to_base)\.", r"mid_block.\1."),
    (r"^up_blocks\.(\d+)\.ctrl_to_base\.", r"up_connections.\1.ctrl_to_base."),
)


def adapter_state(fused_state: dict) -> dict:
    """The ``ControlNetXSAdapter``'s weights in a fused ``UNetControlNetXSModel``'s state."""
    out = {}
    for key, value in fused_state.items():
        for pattern, to in RENAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, to, key)] = value
                break
    return out


def adapter_config(fused_config) -> dict:
    """The ``ControlNetXSAdapter`` config that, fused with the base's UNet, gives ``fused_config``
    (as ``ControlNetXSAdapter.from_unet`` would make it)."""
    c = fused_config
    return dict(
        conditioning_channels=c["ctrl_conditioning_channels"],
        conditioning_channel_order=c["ctrl_conditioning_channel_order"],
        conditioning_embedding_out_channels=tuple(c["ctrl_conditioning_embedding_out_channels"]),
        time_embedding_mix=c["time_embedding_mix"],
        learn_time_embedding=c["ctrl_learn_time_embedding"],
        num_attention_heads=c["ctrl_num_attention_heads"],
        block_out_channels=tuple(c["ctrl_block_out_channels"]),
        base_block_out_channels=tuple(c["block_out_channels"]),
        cross_attention_dim=c["cross_attention_dim"],
        down_block_types=tuple(c["down_block_types"]),
        sample_size=c["sample_size"],
        transformer_layers_per_block=c["transformer_layers_per_block"],
        upcast_attention=c["upcast_attention"],
        max_norm_num_groups=c["ctrl_max_norm_num_groups"],
        use_linear_projection=c["use_linear_projection"],
    )


class ControlNetXS(Adapter):
    name = "controlnet_xs"
    title = "ControlNet-XS"
    families = ("sd", "sdxl")
    settings = ("size_ratio",)
    classes = ("ControlNetXSAdapter",)
    tiny_layers_per_block = LAYERS_PER_BLOCK

    def make(self, fam, base, t, a):
        from diffusers import UNetControlNetXSModel

        from ..models.families.sd import hint_channels

        unet = base.denoiser
        layers = unet.config.layers_per_block
        if any(n != LAYERS_PER_BLOCK for n in (layers if isinstance(layers, list | tuple) else [layers])):
            raise ConfigError(
                f"adapter.kind: controlnet_xs needs a UNet of {LAYERS_PER_BLOCK} resnets per block (SD's, SDXL's); "
                f"the base has layers_per_block {layers} (the tiny base: base.tiny.layers_per_block: {LAYERS_PER_BLOCK})"
            )
        if t.hint_init == "copy":
            raise ConfigError("train.hint_init: copy is for SD3 and Flux (their condition is a latent); expected zero or random")
        hint = {"conditioning_embedding_out_channels": hint_channels(base.vae.config)}
        model = UNetControlNetXSModel.from_unet(unet, size_ratio=a.size_ratio or DEFAULT_SIZE_RATIO, ctrl_optional_kwargs=hint)
        if t.hint_init == "random":  # as the ControlNet's: the condition reaches the control blocks from step 1
            model.controlnet_cond_embedding.conv_out.reset_parameters()
        model.freeze_unet_params()
        return model

    def new_layers(self, fam):
        return ("controlnet_cond_embedding", "control_to_base_for_conv_in")

    def residuals(self, fam, module, noised, text, batch, control, device):
        """The fused model's prediction (it runs the frozen UNet's parts itself)."""
        dtype = next(p for p in module.parameters() if p.requires_grad).dtype
        return fam.denoise(module, noised, text, batch, {"controlnet_cond": control}, dtype, device)

    def predict(self, fam, denoiser, noised, text, batch, residuals, dtype, device):
        return residuals

    def pipeline_class(self, fam):
        return {"sd": "StableDiffusionControlNetXSPipeline", "sdxl": "StableDiffusionXLControlNetXSPipeline"}[fam.name]

    def pipeline(self, fam, base, module, scheduler=None):
        """The stock pipeline: with a saved adapter, it fuses it with the base's UNet itself; with
        the model in training (already fused), that model is its UNet."""
        import diffusers

        parts = fam.pipeline_parts(base, scheduler)
        if isinstance(module, diffusers.UNetControlNetXSModel):
            parts["unet"], module = module, None
        return getattr(diffusers, self.pipeline_class(fam))(controlnet=module, **parts)

    def save(self, module, folder, settings):
        self.from_state(folder, module.state_dict(), settings, like=module).save_pretrained(folder)

    def from_state(self, final, state, settings, like=None):
        """The adapter's part of a fused model's weights, as the ``ControlNetXSAdapter`` that
        ``final`` holds (or that fused model ``like`` was made from)."""
        from diffusers import ControlNetXSAdapter

        if like is None:
            config = ControlNetXSAdapter.load_config(final)
        else:
            config = like.config if isinstance(like, ControlNetXSAdapter) else adapter_config(like.config)
        model = ControlNetXSAdapter.from_config(config)
        model.load_state_dict(adapter_state(state) if "base_conv_in.weight" in state else state)
        return model
