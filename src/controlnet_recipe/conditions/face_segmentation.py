"""``face_segmentation``: 68 landmarks drawn into a face-part map (each part filled with its own
colour on black), as the source recipe does. The landmarks are the source's ground truth or
detected (dlib, SPIGA) with the same drawing code. Its fidelity: the landmarks re-detected in
generated images (a heatmap network learned on the pairs, or dlib), their NME, and the face map
redrawn from them (mIoU against the condition)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core import buckets as B
from ..core.images import images_to_tensor
from ..faces.draw import PALETTE, PARTS, draw_segmentation
from ..metrics.landmarks import landmark_fidelity
from ..models.landmark_net import LandmarkNet, train_landmark_net
from .condition import Fidelity
from .landmarks import LandmarkDrawn
from .maps import MapType

LANDMARKS = "landmarks.pt"  # the evaluator's landmark re-detector, in models/evaluator
FACE_AREA = 0.02  # the extractor "finds a face" when at least this share of pixels is a face part


def in_square(points, size: tuple[int, int], resolution: int) -> np.ndarray:
    """Landmarks of an image of ``size`` moved into its centre square at ``resolution`` (images_to_tensor's crop)."""
    return B.move_points(points, size, B.cover(*size, (resolution, resolution)))


class FaceSegmentation(LandmarkDrawn):
    name = "face_segmentation"
    about_faces = True
    photo_hint = "the face segmentation map of its landmarks"
    draw = staticmethod(draw_segmentation)

    def map_type(self, conditions: list, resolution: int) -> MapType:
        palette = tuple(tuple(int(v) for v in c) for c in PALETTE)
        return MapType("categorical", palette, PARTS, ignore=0, why="categorical: the face-part palette this kind draws")

    def train_models(self, rows, pixels, folder: Path, ev, r) -> dict:
        if ev.landmarks != "learned":
            return {}
        keep = [i for i, faces in enumerate(rows["landmarks"]) if faces]
        res = pixels.shape[-1]
        if "bucket" in rows.column_names:  # aspect buckets: each image's landmarks into its square crop
            sizes = [B.parse(b) for b in rows["bucket"]]
            targets = torch.tensor(np.array([in_square(rows["landmarks"][i][0], sizes[i], res) for i in keep]))
        else:
            targets = torch.tensor(np.array([rows["landmarks"][i][0] for i in keep], dtype=np.float32))
            width = rows[r.columns.image][0].width if len(rows) else r.data.resolution
            targets = targets * (res / width)
        net = train_landmark_net(pixels[keep], targets, ev.landmark_steps, ev.batch_size, ev.learning_rate, ev.width, r.data.seed)
        net.save(folder / LANDMARKS)
        return {"landmarks": "learned"}

    def fidelity(self, r, folder: Path, extractor) -> Fidelity:
        return FaceFidelity(r, folder, extractor)

    def targets(self, rows_landmarks, conditions: list, resolution: int) -> list:
        """The first face's landmarks of each row (what drew its condition), scaled to ``resolution``."""
        if rows_landmarks is None:
            return [None] * len(conditions)
        out = []
        for faces, cond in zip(rows_landmarks, conditions):
            if not faces:
                out.append(None)
            elif cond.width != cond.height:  # an aspect bucket: into the square crop the scores see
                out.append(in_square(faces[0], cond.size, resolution))
            else:
                out.append(np.asarray(faces[0], dtype=np.float32) * (resolution / cond.width))
        return out


class FaceFidelity(Fidelity):
    """Landmarks re-detected in generated images: NME against the ones that drew the condition,
    ``found``, and ``miou``: the face map redrawn from them against the condition's."""

    headline = "miou"
    why = "mIoU of the face map redrawn from the landmarks re-detected in the image"

    def __init__(self, r, folder: Path, extractor):
        self.res, self.extractor = r.data.resolution, extractor
        learned = r.evaluator.landmarks == "learned"
        self.landmark_net = LandmarkNet.load(folder / LANDMARKS) if learned and (folder / LANDMARKS).is_file() else None
        self.detector = None
        if self.landmark_net is None or extractor is None:  # dlib asked for, or nothing else can tell a face
            from ..faces.landmarks import get_detector as load

            self.detector = load("dlib")

    def face_found(self, images: list) -> np.ndarray:
        """Whether each image shows a face: dlib finds one, or the extractor labels enough pixels."""
        if self.detector is not None:
            return np.array([bool(self.detector.detect(np.asarray(im.convert("RGB")))) for im in images])
        return (self.extractor.predict(images) > 0).mean((1, 2)) >= FACE_AREA

    def detect(self, images: list) -> list[np.ndarray | None]:
        """The largest face's 68 landmarks in each image (pixels at the evaluation resolution), or None."""
        if self.detector is not None:
            found = [self.detector.detect(np.asarray(im.convert("RGB").resize((self.res, self.res)))) for im in images]
            return [f[0] if f else None for f in found]
        pts = self.landmark_net.predict(images_to_tensor(images, self.res))
        return [p if ok else None for p, ok in zip(pts, self.face_found(images))]

    def scores(self, images: list, conditions: list, targets: list) -> dict[str, np.ndarray]:
        keep = [i for i, t in enumerate(targets) if t is not None]
        detected = self.detect(images)
        fid = landmark_fidelity([detected[i] for i in keep], [targets[i] for i in keep], (self.res, self.res))
        out = {}
        for k, v in fid.items():
            full = np.full(len(images), np.nan)
            full[keep] = v
            out[k] = full
        return out
