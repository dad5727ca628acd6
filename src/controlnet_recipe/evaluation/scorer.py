"""Per-image scores: condition fidelity (landmark NME, redrawn-segmentation mIoU, detection
failures; edge F1 for Canny), prompt adherence (CLIP score), and whether a face is there at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..config import Recipe
from ..images import images_to_tensor
from ..metrics.clip import Clip, to_uint8
from ..metrics.landmarks import landmark_fidelity
from ..metrics.segmentation import confusion, face_miou, labels_tensor, segment
from ..models.segmenter import CLIP_REF, LANDMARKS, SEGMENTER
from ..storage import EVALUATOR_DIR, read_json

FACE_AREA = 0.02  # the segmenter "finds a face" when at least this share of pixels is a face part

# The fidelity metric the checkpoint rule uses, per condition kind (all: higher is better).
FIDELITY = {"face_segmentation": "miou", "canny": "edge_f1", "given": "miou_segmenter"}


class Scorer:
    """Loads what the evaluator stage made (or names) and scores lists of PIL images."""

    def __init__(self, r: Recipe, folder: Path = EVALUATOR_DIR):
        from ..models.landmark_net import LandmarkNet
        from ..models.segmenter import Segmenter

        self.kind, self.res = r.conditions.kind, r.data.resolution
        self.canny = (r.conditions.canny_low, r.conditions.canny_high)
        self.segmenter = Segmenter.load(folder / SEGMENTER) if (folder / SEGMENTER).is_file() else None
        faces, learned = self.kind == "face_segmentation", r.evaluator.landmarks == "learned"
        self.landmark_net = LandmarkNet.load(folder / LANDMARKS) if faces and learned else None
        self.detector = None
        if not learned or self.segmenter is None:  # dlib asked for, or nothing else can tell a face (Canny)
            from ..faces.landmarks import get_detector

            self.detector = get_detector("dlib")
        self.clip = Clip.load(**read_json(folder / CLIP_REF))
        self.fidelity_key = FIDELITY[self.kind]

    def _segment(self, images: list[Image.Image]) -> np.ndarray:
        return segment(self.segmenter, images_to_tensor(images, self.res))

    def face_found(self, images: list[Image.Image], seg: np.ndarray | None = None) -> np.ndarray:
        """Whether each image shows a face: dlib finds one, or the segmenter (``seg``, if already
        computed) labels enough pixels."""
        if self.detector is not None:
            return np.array([bool(self.detector.detect(np.asarray(im.convert("RGB")))) for im in images])
        return ((self._segment(images) if seg is None else seg) > 0).mean((1, 2)) >= FACE_AREA

    def detect(self, images: list[Image.Image], seg: np.ndarray | None = None) -> list[np.ndarray | None]:
        """The largest face's 68 landmarks in each image (in pixels at the evaluation resolution), or None."""
        if self.detector is not None:
            found = [self.detector.detect(np.asarray(im.convert("RGB").resize((self.res, self.res)))) for im in images]
            return [f[0] if f else None for f in found]
        pts = self.landmark_net.predict(images_to_tensor(images, self.res))
        return [p if ok else None for p, ok in zip(pts, self.face_found(images, seg))]

    def fidelity(self, images: list[Image.Image], conditions: list[Image.Image], targets: list[np.ndarray | None]) -> dict:
        """Per-image fidelity metrics against the conditions (and, for face maps, the landmarks that drew them)."""
        out = {}
        seg = self._segment(images) if self.segmenter is not None and self.kind != "canny" else None  # segmented once
        if self.kind == "face_segmentation":
            keep = [i for i, t in enumerate(targets) if t is not None]
            fid = landmark_fidelity(
                [d for i, d in enumerate(self.detect(images, seg)) if i in keep], [targets[i] for i in keep], (self.res, self.res)
            )
            for k, v in fid.items():
                full = np.full(len(images), np.nan)
                full[keep] = v
                out[k] = full
        elif self.kind == "canny":
            from ..conditions.canny import canny, edge_f1

            lo, hi = self.canny
            out["edge_f1"] = np.array(
                [
                    edge_f1(np.asarray(canny(im, lo, hi)), np.asarray(c.convert("L").resize(im.size, 0)))
                    for im, c in zip(images, conditions)
                ]
            )
        if seg is not None:
            truth = labels_tensor(conditions, self.res).numpy()
            out["miou_segmenter"] = np.array([face_miou(confusion(p, t))[0] for p, t in zip(seg, truth)])
        return out

    def clip_score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return self.clip.clip_score(to_uint8(images, self.res), prompts)


def target_landmarks(rows_landmarks: list, conditions: list[Image.Image], resolution: int) -> list[np.ndarray | None]:
    """The first face's landmarks of each row (what drew its condition), scaled to ``resolution``."""
    out = []
    for faces, cond in zip(rows_landmarks, conditions):
        if not faces:
            out.append(None)
            continue
        out.append(np.asarray(faces[0], dtype=np.float32) * (resolution / cond.width))
    return out
