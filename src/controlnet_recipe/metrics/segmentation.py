"""Segmentation agreement: a confusion matrix accumulated over a set of images, and IoU from it."""

from __future__ import annotations

import numpy as np

from ..faces.draw import PARTS


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int = len(PARTS)) -> np.ndarray:
    """(classes, classes) counts, rows = target, columns = prediction, over any number of images."""
    idx = target.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class over the whole set (NaN where a class appears in neither)."""
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def face_miou(conf: np.ndarray) -> tuple[float, dict[str, float]]:
    """Mean IoU over the face parts (the background is left out: it is easy and would hide misses)."""
    iou = iou_per_class(conf)
    per_part = {name: float(v) for name, v in zip(PARTS, iou) if name != "background" and not np.isnan(v)}
    return float(np.mean(list(per_part.values()))) if per_part else 0.0, per_part
