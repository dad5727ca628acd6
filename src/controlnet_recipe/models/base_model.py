"""Loading the base Stable Diffusion model, wherever it came from, through ``from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingInput
from ..storage import BASE_DIR, read_json

BASE_FILE = "base.json"


@dataclass(frozen=True)
class BaseRef:
    """What the base stage resolved: a hub id or a local folder, and a revision."""

    name_or_path: str
    revision: str | None = None

    @classmethod
    def read(cls, folder: Path = BASE_DIR) -> BaseRef:
        f = folder / BASE_FILE
        if not f.is_file():
            raise MissingInput(f"{f}: no base model resolved; run the base stage first (dvc repro)")
        return cls(**read_json(f))


@dataclass
class BaseComponents:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object


def load_base(ref: BaseRef) -> BaseComponents:
    """Each component from its subfolder, exactly as for ``stabilityai/stable-diffusion-2-1-base``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    kw = {"revision": ref.revision}
    return BaseComponents(
        tokenizer=AutoTokenizer.from_pretrained(ref.name_or_path, subfolder="tokenizer", **kw),
        text_encoder=CLIPTextModel.from_pretrained(ref.name_or_path, subfolder="text_encoder", **kw),
        vae=AutoencoderKL.from_pretrained(ref.name_or_path, subfolder="vae", **kw),
        unet=UNet2DConditionModel.from_pretrained(ref.name_or_path, subfolder="unet", **kw),
        noise_scheduler=DDPMScheduler.from_pretrained(ref.name_or_path, subfolder="scheduler", **kw),
    )


def pipeline_components(b: BaseComponents, scheduler=None) -> dict:
    """Keyword arguments for a Stable Diffusion pipeline (plain or ControlNet) made of the base's
    components: UniPC for sampling unless ``scheduler`` is given, no safety checker."""
    from diffusers import UniPCMultistepScheduler

    return dict(
        vae=b.vae,
        text_encoder=b.text_encoder,
        tokenizer=b.tokenizer,
        unet=b.unet,
        scheduler=scheduler or UniPCMultistepScheduler.from_config(b.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def inference_device():
    """Where sampling runs: ("cuda", float16) on a GPU, else ("cpu", float32)."""
    import torch

    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


def seeded(seeds: list[int]) -> list:
    """One CPU generator per image, so image i comes from ``seeds[i]`` whatever the batching."""
    import torch

    return [torch.Generator().manual_seed(s) for s in seeds]


def make_pipeline(b: BaseComponents, controlnet=None, *, device=None, dtype=None):
    """The one way a sampling pipeline is built (validation, evaluation, generate): the base's
    components with UniPC and no safety checker, plus ``controlnet`` if given, with a quiet
    progress bar. With ``device``, the components (and the ControlNet) are moved there first."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    if device is not None:
        for m in (b.unet, b.vae, b.text_encoder, *([controlnet] if controlnet is not None else [])):
            m.to(device, dtype)
    parts = pipeline_components(b)
    pipe = (
        StableDiffusionPipeline(**parts)
        if controlnet is None
        else StableDiffusionControlNetPipeline(controlnet=controlnet, **parts)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
