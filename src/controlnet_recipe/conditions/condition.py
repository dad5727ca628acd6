"""What a condition kind supplies. The stages, ``generate``, the web demo and the evaluation ask
the recipe's :class:`Condition` and never name a kind; adding one is a module with a subclass,
listed in ``conditions.KINDS``.

A condition kind says:
- how a condition is made from an image and its row (:meth:`make_batch`), and from a photo in
  ``generate`` and the web demo (:meth:`from_photo`);
- what its maps are (:meth:`map_type`: categorical with a palette, binary lines, continuous), and
  so which fidelity fits it;
- which models re-extract it from generated images, besides the extractor every kind gets
  (:meth:`fidelity`), and which evaluator models it trains (:meth:`train_models`);
- whether face metrics and probes apply (``about_faces``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np

from ..core.errors import BadInput
from .maps import MapType

if TYPE_CHECKING:
    from PIL import Image

    from ..core.config import ConditionsCfg, EvaluatorCfg, Recipe
    from .extractor import Extractor


class ConditionError(BadInput):
    """A condition cannot be made from this input (no face found, a kind that needs given maps)."""


class Made(NamedTuple):
    """One sample's condition, or why it has none; the landmarks it was drawn from (faces)."""

    condition: Image.Image | None
    reason: str | None = None
    landmarks: list | None = None


class Fidelity:
    """Models that re-extract the condition from generated images (beside the learned extractor):
    per-image scores against the conditions; ``headline`` when one of them is the one to rank by."""

    headline: str | None = None
    why: str = ""

    def scores(self, images: list, conditions: list, targets: list) -> dict[str, np.ndarray]:
        raise NotImplementedError


class Condition:
    """The base class: a kind overrides what differs. One instance per recipe's ``conditions``."""

    name: ClassVar[str]
    about_faces: ClassVar[bool] = False  # face metrics (NME) and face probes apply
    uses_model: ClassVar[bool] = False  # made by a neural model: batched, one process per GPU
    photo_hint: ClassVar[str] = "the condition drawn from it"  # what the web demo makes of a photo

    def __init__(self, c: ConditionsCfg):
        self.c = c

    # -- making conditions -----------------------------------------------------------------------
    def make_batch(self, images: list, rows: list[dict]) -> list[Made]:
        """A condition per image (``rows``: each sample's other columns: landmarks, problem, the
        source's own condition, ``source_condition``)."""
        return [self.make(im, row) for im, row in zip(images, rows)]

    def make(self, image: Image.Image, row: dict) -> Made:
        raise NotImplementedError

    def from_photo(self, photo: Image.Image, name: str = "the photo") -> Image.Image:
        """The condition the conditions stage would make of ``photo`` (any size)."""
        made = self.make_batch([photo], [{"landmarks": None, "problem": None, "source_condition": None}])[0]
        if made.condition is None:
            raise ConditionError(f"{name}: no {self.name} condition ({made.reason})")
        return made.condition

    def report(self) -> dict:
        """What made the conditions, for the stage's report and the model card."""
        return {"kind": self.name}

    # -- scoring ------------------------------------------------------------------------------
    def map_type(self, conditions: list, resolution: int) -> MapType:
        """The type of this kind's maps (``conditions``: training conditions, for kinds that read it
        from the data)."""
        raise NotImplementedError

    def train_models(self, rows, pixels, folder: Path, ev: EvaluatorCfg, r: Recipe) -> dict:
        """Evaluator models of this kind's own (faces: a landmark re-detector); their report."""
        return {}

    def fidelity(self, r: Recipe, folder: Path, extractor: Extractor | None) -> Fidelity | None:
        """The models that re-extract this condition from generated images, if any."""
        return None

    def targets(self, rows_landmarks: list | None, conditions: list, resolution: int) -> list:
        """What :meth:`Fidelity.scores` compares against besides the condition (faces: landmarks)."""
        return [None] * len(conditions)
