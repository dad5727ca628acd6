"""Agreement between two condition maps of one image, per map type (as ControlNet++ reports per
condition): mIoU for categorical maps, F1 for binary ones (edges, lines, outlines), SSIM and RMSE
for continuous ones (depth, shading). Each function scores one pair of maps."""

from __future__ import annotations

import cv2
import numpy as np

from .segmentation import confusion, iou_per_class


def miou(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int | None = None) -> float:
    """Mean IoU over the classes present in either (H, W) class map; ``ignore`` (a background
    class that is easy and would hide misses) is left out. Two maps of nothing else score 1.0."""
    iou = iou_per_class(confusion(pred, target, num_classes))
    keep = [i for i in range(num_classes) if i != ignore and not np.isnan(iou[i])]
    return float(np.mean(iou[keep])) if keep else 1.0


def _dilate(mask: np.ndarray, tolerance: int) -> np.ndarray:
    if tolerance <= 0:
        return mask
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def f1(pred: np.ndarray, target: np.ndarray, tolerance: int = 1) -> float:
    """F1 between two (H, W) boolean maps, a pixel matching within ``tolerance`` pixels.

    Precision: predicted pixels with a target pixel within a (2t+1)^2 square; recall the same the
    other way. Two empty maps score 1.0; one empty map 0.0.
    """
    p, t = pred.astype(bool), target.astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"maps differ in shape: {p.shape} vs {t.shape}")
    n_p, n_t = int(p.sum()), int(t.sum())
    if n_p == 0 and n_t == 0:
        return 1.0
    if n_p == 0 or n_t == 0:
        return 0.0
    precision = float((p & _dilate(t, tolerance)).sum()) / n_p
    recall = float((t & _dilate(p, tolerance)).sum()) / n_t
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def ssim(pred: np.ndarray, target: np.ndarray) -> float:
    """Structural similarity of two (H, W) or (H, W, C) maps in [0, 1] (Gaussian window, sigma 1.5,
    as Wang et al.; channels averaged)."""
    from skimage.metrics import structural_similarity

    axis = -1 if pred.ndim == 3 else None
    a, b = pred.astype(np.float64), target.astype(np.float64)
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=axis, gaussian_weights=True))


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared error of two maps in [0, 1] (lower is better)."""
    return float(np.sqrt(np.mean((pred.astype(np.float64) - target.astype(np.float64)) ** 2)))
