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
