"""Per-image scores: condition fidelity (the learned extractor's, by the condition's map type, and
the condition kind's own re-extraction: landmark NME and redrawn mIoU for faces, edge F1 for
Canny, a second model for depth or segmentation) and prompt adherence (CLIP score)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..conditions import condition
from ..conditions.extractor import Extractor
from ..core.config import Recipe
from ..core.errors import MissingInput
from ..core.storage import EVALUATOR_DIR, read_json
from ..metrics.clip import Clip, to_uint8
from ..models.segmenter import CLIP_REF


class Scorer:
    """Loads what the evaluator stage made (or names) and scores lists of PIL images."""

    def __init__(self, r: Recipe, folder: Path = EVALUATOR_DIR):
        self.res = r.data.resolution
        self.condition = condition(r.conditions)
        self.extractor = Extractor.load(folder)
        self.reextract = self.condition.fidelity(r, folder, self.extractor)
        self.clip = Clip.load(**read_json(folder / CLIP_REF))
        own = self.reextract.headline if self.reextract is not None else None
        if own is None and self.extractor is None:
            raise MissingInput(f"{folder}: no condition extractor; run the evaluator stage first (dvc repro evaluator)")
        self.fidelity_key = own or self.extractor.headline
        self.fidelity_why = self.reextract.why if own else self.extractor.map_type.metric_why()

    @property
    def about_faces(self) -> bool:
        return self.condition.about_faces

    def face_found(self, images: list[Image.Image]) -> np.ndarray:
        """Whether each image shows a face (face conditions only)."""
        return self.reextract.face_found(images)

    def fidelity(self, images: list[Image.Image], conditions: list[Image.Image], targets: list) -> dict[str, np.ndarray]:
        """Per-image fidelity metrics against the conditions (and what drew them: face landmarks)."""
        out = self.reextract.scores(images, conditions, targets) if self.reextract is not None else {}
        if self.extractor is not None:
            out.update(self.extractor.scores(images, conditions))
        return out

    def clip_score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return self.clip.clip_score(to_uint8(images, self.res), prompts)
