"""mIoU from a confusion matrix accumulated over images."""

from __future__ import annotations

import numpy as np
import pytest

from controlnet_recipe.faces.draw import PARTS
from controlnet_recipe.metrics.segmentation import confusion, face_miou, iou_per_class


def test_perfect_and_disjoint():
    target = np.zeros((2, 8, 8), np.uint8)
    target[:, 2:6, 2:6] = 1
    assert face_miou(confusion(target, target))[0] == 1.0
    pred = np.zeros_like(target)
    pred[:, 0:2, 0:2] = 1
    assert face_miou(confusion(pred, target))[0] == 0.0


def test_partial_overlap_value():
    target = np.zeros((1, 4, 4), np.uint8)
    target[0, :, :2] = 1  # 8 pixels
    pred = np.zeros_like(target)
    pred[0, :2, :] = 1  # 8 pixels, 4 shared
    iou = iou_per_class(confusion(pred, target))
    assert iou[1] == pytest.approx(4 / 12)
    assert iou[0] == pytest.approx(4 / 12)
    miou, per_part = face_miou(confusion(pred, target))
    assert per_part == {"skin": pytest.approx(4 / 12)}  # parts absent from both are left out
    assert miou == pytest.approx(4 / 12)


def test_confusion_shape_and_total():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(PARTS), (2, 3, 16, 16))
    conf = confusion(a, b)
    assert conf.shape == (len(PARTS), len(PARTS)) and conf.sum() == 3 * 16 * 16
