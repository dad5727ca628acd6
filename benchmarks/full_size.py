"""The benchmarks' UNet-family models (SD, SDXL) with random weights, shared by train_step.py (the
training step) and gpu_check.py (the validation rows): the demo's tiny base (models/tiny.py), or a
full-size architecture built from its configs (models/architectures.py), on the GPU when given one
(random init of billions of weights on the CPU is slow), with the ControlNet made from the UNet as
the train stage makes it (training/step.py's controlnet_from_unet). Also the compute dtype of a
mixed-precision setting and the GPU's peak memory, as both scripts report it."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

GIB = 1024**3
# the parts a builder call may ask for beside the UNet (the tiny base has no second text encoder)
OPTIONAL_PARTS = ("scheduler", "vae", "text_encoder", "text_encoder_2")


@dataclass
class UNetModels:
    """The frozen UNet (requires_grad off, eval mode), its ControlNet (fp32, trainable), the VAE's
    config (its downsampling sets the hint encoder) and the parts asked for (None when not)."""

    unet: Any
    controlnet: Any
    vae_config: dict
    sdxl: bool
    scheduler: Any = None
    vae: Any = None
    text_encoder: Any = None
    text_encoder_2: Any = None


def is_sdxl(arch: str) -> bool:
    """Whether architecture ``arch`` (``tiny``: the demo's SD-family base) is of the SDXL family."""
    from controlnet_recipe.models.families import family_of_architecture

    return arch != "tiny" and family_of_architecture(arch) == "sdxl"


def text_encoder_names(arch: str) -> tuple[str, ...]:
    """The text encoders of ``arch``: SDXL's two, else one."""
    return ("text_encoder", "text_encoder_2") if is_sdxl(arch) else ("text_encoder",)


def build_unet_models(arch: str, resolution: int, parts: tuple[str, ...] = (), device: torch.device | None = None) -> UNetModels:
    """``arch``'s UNet (``tiny``: the demo's, for ``resolution``) and the ``parts`` asked for (of
    OPTIONAL_PARTS, built in the order given, after the UNet), then the ControlNet made from the
    frozen UNet; all made on ``device`` (None: torch's default, the CPU)."""
    from controlnet_recipe.training.step import controlnet_from_unet

    unknown = set(parts) - set(OPTIONAL_PARTS)
    if unknown:
        raise ValueError(f"parts {sorted(unknown)}: expected some of {', '.join(OPTIONAL_PARTS)}")
    with _default_device(device):
        unet, vae_config, built = _tiny_parts(resolution, parts) if arch == "tiny" else _full_size_parts(arch, parts)
        unet.requires_grad_(False).eval()
        controlnet = controlnet_from_unet(unet, vae_config)
    return UNetModels(unet=unet, controlnet=controlnet, vae_config=vae_config, sdxl=is_sdxl(arch), **built)


def _default_device(device: torch.device | None):
    import torch

    return torch.device(device) if device is not None else nullcontext()


def _tiny_parts(resolution: int, parts: tuple[str, ...]) -> tuple[Any, dict, dict]:
    """The tiny UNet, its VAE's config (from a VAE built for it: the tiny base has no config files)
    and ``parts``."""
    from controlnet_recipe.models import tiny

    builders = {
        "scheduler": tiny.build_scheduler,
        "vae": lambda: tiny.build_vae(resolution),
        "text_encoder": lambda: tiny.build_text_encoder(1000),
    }
    if "text_encoder_2" in parts:
        raise ValueError("the tiny base is of the SD family: it has no text_encoder_2")
    unet = tiny.build_unet(resolution)
    vae_config = tiny.build_vae(resolution).config
    return unet, vae_config, {name: builders[name]() for name in parts}


def _full_size_parts(arch: str, parts: tuple[str, ...]) -> tuple[Any, dict, dict]:
    """Architecture ``arch``'s UNet, its VAE's config (read from its folder) and ``parts``."""
    from controlnet_recipe.models import architectures

    built = architectures.build(arch, ("unet", *parts))
    return built.pop("unet"), architectures.vae_config(arch), built


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype a mixed-precision setting computes in (``no``: fp32)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def cuda_peak_memory() -> dict[str, float]:
    """The GPU's peak allocated and reserved memory since its last reset, in GiB."""
    import torch

    return {
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / GIB,
    }


def timed_validation(base, controlnet, pairs, v, resolution: int, cuda: bool, empty_cache: bool = False) -> dict:
    """training/validation.py's run_validation, timed; on a GPU its peak memory from a reset (after
    emptying PyTorch's cache with ``empty_cache``, as the train stage does before validating)."""
    import time

    import torch

    from controlnet_recipe.training.validation import run_validation

    if cuda:
        torch.cuda.synchronize()
        if empty_cache:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_validation(base, controlnet, pairs, v, resolution, 0)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"samples_per_s": v.num_images / seconds, "micro_batch": v.num_images, "validation_images": v.num_images}
    if cuda:
        out.update(cuda_peak_memory())
    return out
