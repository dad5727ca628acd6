"""Full-size architectures (SD 1.5, SD 2.1-base, SDXL-base; FLUX.1-dev for the planner) built from the configs
shipped in ``configs/architectures``, with random weights: benchmarks measure the real shapes, no
download. SDXL-base: a 2.57B-parameter UNet (its ControlNet 1.25B), a second text encoder with a
projection (OpenCLIP bigG, 695M)."""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ARCHITECTURES = Path(__file__).resolve().parents[1] / "configs" / "architectures"


def names() -> list[str]:
    return sorted(p.name for p in ARCHITECTURES.iterdir() if p.is_dir())


def folder_of(name: str) -> Path:
    """The configs of architecture ``name``: a folder shipped here, or a diffusers model folder."""
    folder = ARCHITECTURES / name
    if folder.is_dir():
        return folder
    if Path(name).is_dir() and (Path(name) / "model_index.json").is_file():
        return Path(name)
    raise ValueError(f"architecture {name!r}: expected one of {', '.join(names())}, or a diffusers model folder")


def build(name: str, parts: tuple[str, ...] = ("unet", "vae", "text_encoder", "scheduler")) -> dict:
    """The named ``parts`` of architecture ``name``, randomly initialised."""
    folder = folder_of(name)
    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
        "vae": lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
        "scheduler": lambda: DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "scheduler")),
    }
    return {p: builders[p]() for p in parts}


def has(name: str, part: str) -> bool:
    """Whether architecture ``name`` has the component ``part`` (a subfolder: text_encoder_2...)."""
    return (folder_of(name) / part / "config.json").is_file()


def vae_config(name: str) -> dict:
    """The VAE's config alone (its downsampling sets the ControlNet's hint encoder)."""
    return AutoencoderKL.load_config(folder_of(name) / "vae")
