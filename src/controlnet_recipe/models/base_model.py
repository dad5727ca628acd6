"""Loading the base model, wherever it came from, through ``from_pretrained``; loading a trained
ControlNet as its family's class; sampling pipelines and their call arguments."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import MissingInput
from ..core.storage import BASE_DIR, read_json
from .families import BaseComponents, family

BASE_FILE = "base.json"


@dataclass(frozen=True)
class BaseRef:
    """What the base stage resolved: a hub id or a local folder, a revision, its family."""

    name_or_path: str
    revision: str | None = None
    family: str = "sd"  # models/families: sd (1.x, 2.x) | sdxl | sd3 | flux
    vae: str | None = None  # a VAE used in place of the base's own (SDXL's fp16-fixed VAE)
    max_sequence_length: int | None = None  # T5 tokens per caption (sd3, flux; None: the family's default)

    @classmethod
    def read(cls, folder: Path = BASE_DIR) -> BaseRef:
        f = folder / BASE_FILE
        if not f.is_file():
            raise MissingInput(f"{f}: no base model resolved; run the base stage first (dvc repro)")
        return cls(**read_json(f))


def load_base(ref: BaseRef) -> BaseComponents:
    """Each component from its subfolder, as the base's family lays them out."""
    return family(ref.family).load(ref.name_or_path, ref.revision, ref.vae, ref.max_sequence_length)


def inference_device():
    """Where sampling runs: ("cuda", float16) on a GPU, else ("cpu", float32)."""
    import torch

    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


def seeded(seeds: list[int]) -> list:
    """One CPU generator per image, so image i comes from ``seeds[i]`` whatever the batching."""
    import torch

    return [torch.Generator().manual_seed(s) for s in seeds]


def make_pipeline(b: BaseComponents, controlnet=None, adapter=None, *, device=None, dtype=None):
    """The one way a sampling pipeline is built (validation, evaluation, generate): the family's
    pipeline of the base's components with its sampler (UniPC for the UNet families, the base's
    flow-matching Euler for the transformer families; no safety checker), plus the trained module
    ``controlnet`` if given, in the stock pipeline of its kind (``adapter``, an adapters.Adapter;
    None: a ControlNet), with a quiet progress bar. With ``device``, the components (and the
    trained module) are moved there first."""
    if device is not None:
        for m in (b.denoiser, b.vae, *b.text_encoders, *([controlnet] if controlnet is not None else [])):
            m.to(device, dtype)
    fam = family(b.family)
    pipe = fam.pipeline(b, controlnet) if adapter is None or controlnet is None else adapter.pipeline(fam, b, controlnet)
    pipe.set_progress_bar_config(disable=True)
    if next(b.vae.parameters()).device.type == "cuda":
        # one image at a time through the VAE's decoder: on an H200, decoding SDXL's four validation
        # images at 1024 px at once took 16 GiB beyond the weights (benchmarks/gpu_check.py)
        b.vae.enable_slicing()
    return pipe


def call_arguments(adapter, kw: dict) -> dict:
    """The family's sampling arguments as the kind's pipeline names them (None: a ControlNet's)."""
    return kw if adapter is None else adapter.call_arguments(kw)


def trained_class_of(folder):
    """The diffusers class a trained module's folder names in its config.json (ControlNetModel,
    SD3ControlNetModel, FluxControlNetModel, T2IAdapter): whichever family and kind trained it."""
    import diffusers

    return getattr(diffusers, diffusers.ControlNetModel.load_config(folder)["_class_name"])


def sampling_kwargs(b: BaseComponents, n: int, guidance_scale: float, conditions=None, scale: float = 1.0, adapter=None) -> dict:
    """The pipeline call's family-specific arguments for ``n`` prompts (guidance, the condition),
    named as the kind of control's pipeline (``adapter``; None: a ControlNet's) takes them."""
    return call_arguments(adapter, family(b.family).sampling_kwargs(b, n, guidance_scale, conditions, scale))
