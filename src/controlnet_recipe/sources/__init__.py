"""Data sources for the data stage: readers that stream RAW rows (undecoded bytes or file paths).

Each reader is ``read(spec: SourceSpec) -> Iterator[SourceRow]``: a generator that yields rows in a
deterministic order (sorted ids) and holds at most one image in memory, so that the stage can
decode in worker processes (:func:`controlnet_recipe.core.images.decode_image`) and count bad files by
reason. Problems found while reading (bad landmarks, a missing conditioning image) are reported in
``SourceRow.problem`` rather than raised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RECIPE_COLUMNS = ("image", "conditioning_image", "caption")


@dataclass
class SourceSpec:
    """Where a source lives and how its columns map to the recipe's."""

    location: str  # URL, hub id, file, glob or folder, depending on the source
    revision: str | None = None  # hub revision (commit, tag or branch)
    sha256: str | None = None  # expected digest of a downloaded archive
    columns: dict[str, str] = field(default_factory=dict)  # source column -> "image" | "conditioning_image" | "caption"
    split: str = "train"
    use_landmarks: bool = True  # read ground-truth landmarks where the source has them
    cache_dir: Path = Path(".cache/controlnet-recipe")  # downloads go here


@dataclass
class SourceRow:
    """One raw sample: nothing decoded yet."""

    id: str
    image: bytes | str  # raw bytes, or a file path
    landmarks: np.ndarray | None = None  # (68, 2) float32, pixels
    problem: str | None = None  # e.g. "bad_landmarks", "missing_conditioning"
    caption: str | None = None
    caption_encoding: str | None = None  # a caption file's encoding when not UTF-8, or text.UNDECODABLE
    conditioning_image: bytes | str | None = None
    skip: str | None = None  # a source entry that is no sample (a symlink loop, a FIFO, ...): counted by this reason


from . import facesynthetics, hub, imagefolder, parquet  # noqa: E402  (they import the classes above)

SOURCES: dict[str, Callable[[SourceSpec], Iterator[SourceRow]]] = {
    "facesynthetics": facesynthetics.read,
    "hub": hub.read,
    "imagefolder": imagefolder.read,
    "parquet": parquet.read,
}

__all__ = ["RECIPE_COLUMNS", "SOURCES", "SourceRow", "SourceSpec"]
