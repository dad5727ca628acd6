"""What a model family supplies (:class:`Family`) and what it loads (:class:`BaseComponents`).

A family is what differs between Stable Diffusion generations: its components, how captions
become the UNet's text conditioning, the extra conditioning its UNet takes, and its pipelines.
The stages ask the base's family and never name one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TEXT = "text_embedding"  # every family's per-token caption embedding (the cache's column)


@dataclass
class BaseComponents:
    """A base model's parts, as its pipeline folder holds them; ``family`` names whose they are."""

    family: str
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object
    tokenizer_2: object | None = None  # SDXL's second text encoder (OpenCLIP bigG) and its tokenizer
    text_encoder_2: object | None = None
    options: dict = field(default_factory=dict)  # the pipeline's own settings (SDXL: force_zeros_for_empty_prompt)

    @property
    def text_encoders(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]


class Family:
    """The base class: a family overrides what differs. Subclasses are stateless singletons."""

    name: str
    title: str  # for people (the model card)
    hub_tag: str  # the Hub's tag for models of this family
    pipelines: tuple[str, ...]  # diffusers pipeline classes whose model_index.json names this family
    pipeline_class: str  # text-to-image, for the base alone
    controlnet_pipeline_class: str  # what loads the trained ControlNet (model card, generate)
    cache_parts: tuple[str, ...]  # the base's subfolders the latent cache depends on
    text_features: tuple[str, ...]  # the cache's per-caption feature columns, TEXT first

    def load(self, name_or_path: str, revision: str | None, vae: str | None = None) -> BaseComponents:
        raise NotImplementedError

    def encode(self, base: BaseComponents, captions: list[str]) -> dict[str, torch.Tensor]:
        """Each caption's text features, ``text_features`` as keys, float32 on the CPU."""
        raise NotImplementedError

    def image_features(self, images: list, resolution: int) -> dict[str, torch.Tensor]:
        """Per-image conditioning besides the latents (SDXL: time ids), for the cache; PIL images."""
        return {}

    def added_cond_kwargs(self, text: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], device) -> dict | None:
        """The UNet's and the ControlNet's extra conditioning for a training batch (None: none)."""
        return None

    def pipeline(self, base: BaseComponents, controlnet=None, scheduler=None):
        raise NotImplementedError

    def caption_features(
        self, base: BaseComponents, captions: list[str], batch_size: int = 64
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(per-caption features, the empty caption's), encoding each distinct caption once."""
        import torch

        unique = sorted(set(captions)) + [""]
        parts = [self.encode(base, unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
        feats = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        row = {c: i for i, c in enumerate(unique[:-1])}
        idx = [row[c] for c in captions]
        return {k: v[idx] for k, v in feats.items()}, {k: v[-1:] for k, v in feats.items()}


def tokenize(tokenizer, texts: list[str], device) -> torch.Tensor:
    """Padded to the tokenizer's length and truncated, as the pipelines tokenize prompts."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
