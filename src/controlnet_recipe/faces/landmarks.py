"""Landmark detectors: an RGB photo in, one (68, 2) iBUG 300-W landmark array per face out.

Two back ends share the :class:`Detector` interface:

- ``dlib`` (default, CPU, offline): dlib's HOG frontal face detector and its 68-point shape predictor.
  The model file ``shape_predictor_68_face_landmarks.dat`` ships in the ``face-recognition-models``
  package (install ``dlib-bin`` and ``face-recognition-models``).
- ``spiga``: the source recipe's SPIGA detector (``pip install spiga``; its weights download at first
  use; its inference framework puts the model on CUDA, so it needs a GPU), with face boxes from dlib
  and landmarks from SPIGA's 300-W model.

Licence note: both landmark models are trained on iBUG 300-W, whose terms allow non-commercial use
only. A condition map drawn from their landmarks inherits that restriction; check it before using a
ControlNet trained on such data commercially.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .draw import NUM_LANDMARKS

DLIB_INSTALL = "pip install dlib-bin face-recognition-models"
SHAPE_PREDICTOR = "shape_predictor_68_face_landmarks.dat"


class Detector(Protocol):
    """Finds faces in an HxWx3 uint8 RGB image; returns float32 (68, 2) (x, y) arrays, largest face first."""

    name: str

    def detect(self, image: np.ndarray) -> list[np.ndarray]: ...


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    return np.ascontiguousarray(image)


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError as e:
        raise RuntimeError(f"dlib is not installed ({e}); run: {DLIB_INSTALL}") from None
    return dlib


def shape_predictor_path() -> Path:
    """The 68-point model inside face-recognition-models, found without importing it (its import needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"face-recognition-models is not installed (it ships {SHAPE_PREDICTOR}); run: {DLIB_INSTALL}")
    for root in spec.submodule_search_locations:
        path = Path(root) / "models" / SHAPE_PREDICTOR
        if path.is_file():
            return path
    raise RuntimeError(f"{SHAPE_PREDICTOR} not found in face-recognition-models; reinstall it: {DLIB_INSTALL}")


def _boxes(face_detector: Any, image: np.ndarray, upsample: int) -> list[Any]:
    """dlib rectangles, largest area first."""
    return sorted(face_detector(image, upsample), key=lambda r: r.width() * r.height(), reverse=True)


class DlibDetector:
    """dlib HOG face detector + 68-point shape predictor; models load on the first :meth:`detect` call."""

    name = "dlib"

    def __init__(self, upsample: int = 1) -> None:
        self.upsample = upsample
        self._face = None
        self._shape = None

    def _load(self) -> None:
        if self._shape is None:
            dlib = _import_dlib()
            path = shape_predictor_path()
            self._face = dlib.get_frontal_face_detector()
            self._shape = dlib.shape_predictor(str(path))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_face": None, "_shape": None}

    def detect(self, image: np.ndarray) -> list[np.ndarray]:
        image = _check_image(image)
        self._load()
        out = []
        for box in _boxes(self._face, image, self.upsample):
            shape = self._shape(image, box)
            out.append(np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32))
        return out

    def __repr__(self) -> str:
        return f"DlibDetector(upsample={self.upsample})"


class SpigaDetector:
    """SPIGA (300-W model) landmarks in dlib's face boxes, as in the source recipe. Needs ``pip install spiga``."""

    name = "spiga"

    def __init__(self, dataset: str = "300wpublic", upsample: int = 1, gpus: tuple[int, ...] = (0,)) -> None:
        self.dataset = dataset
        self.upsample = upsample
        self.gpus = gpus
        self._face = None
        self._spiga = None

    def _load(self) -> None:
        if self._spiga is not None:
            return
        try:
            from spiga.inference.config import ModelConfig
            from spiga.inference.framework import SPIGAFramework
        except ImportError as e:
            raise RuntimeError(
                f"the spiga detector needs SPIGA ({e}); run: pip install spiga (or use the dlib detector)"
            ) from None
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                "the spiga detector needs a CUDA GPU (SPIGA's framework calls .cuda()); use the dlib detector on CPU"
            )
        self._face = _import_dlib().get_frontal_face_detector()
        self._spiga = SPIGAFramework(ModelConfig(self.dataset), gpus=list(self.gpus))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_face": None, "_spiga": None}

    def detect(self, image: np.ndarray) -> list[np.ndarray]:
        image = _check_image(image)
        self._load()
        boxes = _boxes(self._face, image, self.upsample)
        if not boxes:
            return []
        bboxes = [[b.left(), b.top(), b.width(), b.height()] for b in boxes]  # SPIGA wants x, y, w, h
        features = self._spiga.inference(np.ascontiguousarray(image[:, :, ::-1]), bboxes)  # and BGR, as cv2
        out = [np.asarray(lm, dtype=np.float32)[:, :2] for lm in features["landmarks"]]
        for lm in out:
            if lm.shape != (NUM_LANDMARKS, 2):
                raise RuntimeError(f"SPIGA dataset {self.dataset!r} gives {lm.shape[0]} landmarks, not {NUM_LANDMARKS}")
        return out

    def __repr__(self) -> str:
        return f"SpigaDetector(dataset={self.dataset!r}, upsample={self.upsample})"


DETECTORS: dict[str, Callable[..., Detector]] = {"dlib": DlibDetector, "spiga": SpigaDetector}


def get_detector(name: str, **kw: Any) -> Detector:
    """A detector by name (see :data:`DETECTORS`), constructed with ``kw``."""
    if name not in DETECTORS:
        raise ValueError(f"unknown landmark detector {name!r}; known: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name](**kw)
