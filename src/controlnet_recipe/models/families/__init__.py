"""Model families: which base generation a base model is (SD 1.x/2.x, SDXL, SD3, Flux), detected
from its pipeline class (``model_index.json``) or named in params. Adding a family is one module
with a :class:`Family` subclass, listed in ``FAMILIES``; the stages only ever call its methods."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ...core.errors import BadInput
from .family import CONTROL, POOLED, TEXT, BaseComponents, Family, LatentSpace
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import TIME_IDS, StableDiffusionXL

FAMILIES: dict[str, Family] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())}

__all__ = [
    "CONTROL",
    "FAMILIES",
    "POOLED",
    "TEXT",
    "TIME_IDS",
    "BaseComponents",
    "Family",
    "LatentSpace",
    "detect_family",
    "family",
    "family_of_architecture",
    "family_of_pipeline",
    "recipe_buckets",
    "size_multiple",
]


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_pipeline(class_name: str) -> str | None:
    """The family whose pipelines include ``class_name`` (model_index.json's ``_class_name``)."""
    return next((f.name for f in FAMILIES.values() if class_name in f.pipelines), None)


def detect_family(name_or_path: str, revision: str | None = None) -> str:
    """The family of a base model: a local folder's or the hub's ``model_index.json`` names its pipeline."""
    local = Path(name_or_path) / "model_index.json"
    if local.is_file():
        where, index = str(local), json.loads(local.read_text())
    else:
        from huggingface_hub import hf_hub_download

        where = f"{name_or_path}/model_index.json"
        index = json.loads(Path(hf_hub_download(name_or_path, "model_index.json", revision=revision)).read_text())
    cls = index.get("_class_name", "")
    name = family_of_pipeline(cls)
    if name is None:
        known = ", ".join(f"{f.name} ({f.pipeline_class})" for f in FAMILIES.values())
        raise BadInput(f"{where}: _class_name: expected a pipeline of a known family, {known}; got {cls!r}")
    return name


def family_of_architecture(arch: str) -> str:
    """The family of a planner architecture (models/architectures: a shipped config folder or a
    diffusers folder), from its ``model_index.json``'s pipeline class; ``tiny`` (the demo's base): sd."""
    if arch == "tiny":
        return "sd"
    from ..architectures import folder_of

    index = folder_of(arch) / "model_index.json"
    cls = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    name = family_of_pipeline(cls)
    if name is None:
        raise BadInput(f"{index}: _class_name: expected a pipeline of a known family ({', '.join(FAMILIES)}); got {cls!r}")
    return name


def size_multiple(pretrained_model: str | None, family_name: str) -> int:
    """What every image side must divide by for this base: the tiny base's, a named family's, or
    (family ``auto`` with a hub model, not read before the base stage) a multiple of every family's."""
    if pretrained_model is None:
        from ..tiny import SIZE_MULTIPLE

        return SIZE_MULTIPLE
    if family_name == "auto" and (Path(pretrained_model) / "model_index.json").is_file():
        family_name = detect_family(pretrained_model)
    if family_name == "auto":
        return math.lcm(*(f.size_multiple for f in FAMILIES.values()))
    return family(family_name).size_multiple


def recipe_buckets(recipe) -> list[tuple[int, int]] | None:
    """The recipe's aspect-ratio buckets (``data.buckets``), or None when off (square at resolution)."""
    from ...core.buckets import bucket_list

    d, b = recipe.data, recipe.base
    if d.buckets == "off":
        return None
    try:
        return bucket_list(d.buckets, d.resolution, size_multiple(b.pretrained_model, b.family), d.max_aspect)
    except ValueError as e:
        raise BadInput(str(e)) from None
