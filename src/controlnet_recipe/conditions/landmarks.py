"""Conditions drawn from face landmarks: the 68 points come from the source's ground truth or a
detector (dlib, SPIGA), and one drawing function makes the map, the same for both."""

from __future__ import annotations

import numpy as np

from .condition import Condition, ConditionError, Made

_detectors: dict = {}  # one per process and detector name, loaded on first use


def get_detector(name: str):
    if name not in _detectors:
        from ..faces.landmarks import get_detector as load

        _detectors[name] = load(name)
    return _detectors[name]


class LandmarkDrawn(Condition):
    """A condition drawn from each face's 68 landmarks (the source's ground truth or a detector's)
    by :meth:`draw`; a sample with no face, or bad landmarks, has none."""

    @staticmethod
    def draw(faces: list[np.ndarray], size: tuple[int, int]):
        raise NotImplementedError

    @property
    def photo_detector(self) -> str:
        """dlib where the recipe uses ground truth (a photo has none)."""
        return "dlib" if self.c.detector == "ground_truth" else self.c.detector

    def make(self, image, row: dict) -> Made:
        if self.c.detector == "ground_truth":
            lms = row.get("landmarks")
            if row.get("problem") == "bad_landmarks" or not lms:
                return Made(None, "bad_landmarks", [])
            faces = [np.asarray(f, dtype=np.float32) for f in lms]
        else:
            faces = get_detector(self.c.detector).detect(np.asarray(image.convert("RGB")))
            if not faces:
                return Made(None, "no_face", [])
        return Made(self.draw(faces, image.size), None, [f.tolist() for f in faces])

    def from_photo(self, photo, name: str = "the photo"):
        detector = get_detector(self.photo_detector)
        try:
            faces = detector.detect(np.asarray(photo.convert("RGB")))
        except RuntimeError as e:  # detector not installed, SPIGA without CUDA: already one line
            raise ConditionError(str(e)) from None
        if not faces:
            raise ConditionError(f"no face found in {name} (detector: {detector.name})")
        return self.draw(faces, photo.size)

    def report(self) -> dict:
        return {"kind": self.name, "detector": self.c.detector}
