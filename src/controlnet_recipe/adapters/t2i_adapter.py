"""T2I-Adapter (diffusers' ``T2IAdapter``, upstream's ``train_t2i_adapter_sdxl.py``): a small
convolutional network that turns the condition into one feature map per UNet down block, added
inside the frozen UNet's encoder (``down_intrablock_additional_residuals``). Nothing of the base is
copied, so it is a fraction of a ControlNet's size; it runs once per image, not once per step, in
``StableDiffusionAdapterPipeline`` / ``StableDiffusionXLAdapterPipeline``."""

from __future__ import annotations

from .adapter import Adapter

DEFAULT_RES_BLOCKS = 2  # diffusers' T2IAdapter default (upstream's SDXL script keeps it)


def adapter_config(unet_config: dict, vae_config: dict, num_res_blocks: int | None) -> dict:
    """The T2IAdapter that fits the UNet: one feature map per down block, each of the block's width
    at the resolution the UNet adds it. A UNet whose first block has cross-attention (SD 1.x/2.x)
    adds it inside that block, at the latent's size (``full_adapter``); one whose first block has
    none (SDXL, the demo's tiny base) adds the first after that block's downsampling, so the maps
    start at half the latent's size and the second stays there (``full_adapter_xl``)."""
    vae_down = 2 ** (len(vae_config["block_out_channels"]) - 1)
    first_attends = unet_config["down_block_types"][0].startswith("CrossAttn")
    return dict(
        in_channels=3,
        channels=list(unet_config["block_out_channels"]),
        num_res_blocks=num_res_blocks or DEFAULT_RES_BLOCKS,
        downscale_factor=vae_down if first_attends else 2 * vae_down,
        adapter_type="full_adapter" if first_attends else "full_adapter_xl",
    )


class T2IAdapterKind(Adapter):
    name = "t2i_adapter"
    title = "T2I-Adapter"
    families = ("sd", "sdxl")
    settings = ("num_res_blocks",)
    classes = ("T2IAdapter",)
    pipeline_argument = "adapter"
    scale_argument = "adapter_conditioning_scale"

    def make(self, fam, base, t, a):
        from diffusers import T2IAdapter

        return T2IAdapter(**adapter_config(base.denoiser.config, base.vae.config, a.num_res_blocks))

    def new_layers(self, fam):
        return ("adapter",)  # all of it is new: new_layers_lr_multiplier scales the whole adapter

    def residuals(self, fam, module, noised, text, batch, control, device):
        return module(control)

    def predict(self, fam, denoiser, noised, text, batch, residuals, dtype, device):
        extra = {"down_intrablock_additional_residuals": [r.to(dtype) for r in residuals]}
        return fam.denoise(denoiser, noised, text, batch, extra, dtype, device)

    def pipeline_class(self, fam):
        return {"sd": "StableDiffusionAdapterPipeline", "sdxl": "StableDiffusionXLAdapterPipeline"}[fam.name]
