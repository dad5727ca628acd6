"""Loading the base Stable Diffusion model, wherever it came from, through ``from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingInput
from ..storage import BASE_DIR, read_json
from .families import BaseComponents, family

BASE_FILE = "base.json"


@dataclass(frozen=True)
class BaseRef:
    """What the base stage resolved: a hub id or a local folder, a revision, its family."""

    name_or_path: str
    revision: str | None = None
    family: str = "sd"  # models/families: sd (1.x, 2.x) | sdxl
    vae: str | None = None  # a VAE used in place of the base's own (SDXL's fp16-fixed VAE)

    @classmethod
    def read(cls, folder: Path = BASE_DIR) -> BaseRef:
        f = folder / BASE_FILE
        if not f.is_file():
            raise MissingInput(f"{f}: no base model resolved; run the base stage first (dvc repro)")
        return cls(**read_json(f))


def load_base(ref: BaseRef) -> BaseComponents:
    """Each component from its subfolder, as the base's family lays them out."""
    return family(ref.family).load(ref.name_or_path, ref.revision, ref.vae)


def inference_device():
    """Where sampling runs: ("cuda", float16) on a GPU, else ("cpu", float32)."""
    import torch

    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


def seeded(seeds: list[int]) -> list:
    """One CPU generator per image, so image i comes from ``seeds[i]`` whatever the batching."""
    import torch

    return [torch.Generator().manual_seed(s) for s in seeds]


def make_pipeline(b: BaseComponents, controlnet=None, *, device=None, dtype=None):
    """The one way a sampling pipeline is built (validation, evaluation, generate): the family's
    pipeline of the base's components with UniPC (and no safety checker), plus ``controlnet`` if
    given, with a quiet progress bar. With ``device``, the components (and the ControlNet) are
    moved there first."""
    if device is not None:
        for m in (b.unet, b.vae, *b.text_encoders, *([controlnet] if controlnet is not None else [])):
            m.to(device, dtype)
    pipe = family(b.family).pipeline(b, controlnet)
    pipe.set_progress_bar_config(disable=True)
    if next(b.vae.parameters()).device.type == "cuda":
        # one image at a time through the VAE's decoder: on an H200, decoding SDXL's four validation
        # images at 1024 px at once took 16 GiB beyond the weights (benchmarks/gpu_check.py)
        b.vae.enable_slicing()
    return pipe
