"""Landmark detectors: dlib on a real photo (offline), the registry, and SPIGA's missing-package error."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest

from controlnet_recipe.faces.draw import draw_label_map, draw_segmentation
from controlnet_recipe.faces.landmarks import DETECTORS, DlibDetector, SpigaDetector, get_detector

pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def detected(astronaut):
    det = DlibDetector()
    return det, det.detect(astronaut)


def test_dlib_finds_two_faces_on_the_astronaut(astronaut, detected):
    """The largest is Eileen Collins' face; the second is the round mission patch on her suit, which dlib's
    HOG detector (upsample=1) takes for a face: a real false positive, kept as a fixed point of the test."""
    _, faces = detected
    h, w = astronaut.shape[:2]
    assert len(faces) == 2
    assert faces[0][:, 1].mean() < h / 2 < faces[1][:, 1].mean()  # the face, then the patch
    for lm in faces:
        assert lm.shape == (68, 2) and lm.dtype == np.float32
        assert (lm >= 0).all() and (lm[:, 0] < w).all() and (lm[:, 1] < h).all()
        # iBUG layout: the subject's right eye (36-41) is left of the left eye in the image, chin below nose.
        assert lm[36:42, 0].mean() < lm[42:48, 0].mean()
        assert lm[8, 1] > lm[30, 1]
    areas = [np.ptp(lm[:, 0]) * np.ptp(lm[:, 1]) for lm in faces]
    assert areas[0] >= areas[1] * 0.8  # sorted by detector box area; landmark spread roughly follows it


def test_segmentation_draws_both_faces(astronaut, detected):
    _, faces = detected
    h, w = astronaut.shape[:2]
    seg = draw_segmentation(faces, (w, h))
    assert seg.size == (w, h)
    labels = draw_label_map(faces, (w, h))
    for lm in faces:
        x0, y0 = np.floor(lm.min(0)).astype(int)
        x1, y1 = np.ceil(lm.max(0)).astype(int)
        box = labels[y0:y1, x0:x1]
        assert (box > 0).mean() > 0.3
    arr = np.asarray(seg)
    assert (arr.sum(-1) > 0).sum() == (labels > 0).sum()


def test_detector_pickles_before_and_after_use(detected, astronaut):
    fresh = pickle.loads(pickle.dumps(DlibDetector(upsample=0)))
    assert fresh.upsample == 0
    used, faces = detected
    clone = pickle.loads(pickle.dumps(used))
    assert clone._shape is None and used._shape is not None  # the loaded models stay behind
    again = clone.detect(astronaut)
    assert len(again) == len(faces) and all(np.allclose(a, b) for a, b in zip(again, faces))


def test_blank_image_has_no_faces(detected):
    det, _ = detected
    assert det.detect(np.zeros((64, 80, 3), np.uint8)) == []


def test_rejects_non_rgb_arrays(detected):
    det, _ = detected
    with pytest.raises(ValueError, match="RGB"):
        det.detect(np.zeros((64, 64), np.uint8))


def test_registry():
    assert set(DETECTORS) == {"dlib", "spiga"}
    assert isinstance(get_detector("dlib", upsample=2), DlibDetector)
    assert get_detector("dlib", upsample=2).upsample == 2
    with pytest.raises(ValueError) as e:
        get_detector("mediapipe")
    assert "dlib" in str(e.value) and "spiga" in str(e.value)


def test_spiga_missing_is_one_clear_line():
    if importlib.util.find_spec("spiga") is not None:
        pytest.skip("spiga is installed")
    det = SpigaDetector()  # cheap: nothing imported yet
    pickle.dumps(det)
    with pytest.raises(RuntimeError) as e:
        det.detect(np.zeros((32, 32, 3), np.uint8))
    msg = str(e.value)
    assert "pip install spiga" in msg and "\n" not in msg
