"""Canny-edge condition (as lllyasviel's canny ControlNet) and an edge F1 score to check generations against it."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ..images import to_rgb


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """OpenCV Canny on the grayscale image: an RGB image of the same size, white edges on black."""
    gray = cv2.cvtColor(np.asarray(to_rgb(image)), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def _binary(edges: np.ndarray | Image.Image) -> np.ndarray:
    """Any non-zero pixel (in any channel) is an edge."""
    arr = np.asarray(edges)
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    return arr > 0


def _dilate(mask: np.ndarray, tolerance: int) -> np.ndarray:
    if tolerance <= 0:
        return mask
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def edge_f1(pred: np.ndarray, target: np.ndarray, tolerance: int = 1) -> float:
    """F1 between two binary edge maps (bool, 0/1, or 0/255; HxW or HxWx3), matching within ``tolerance`` pixels.

    Precision: predicted edge pixels with a target edge within a (2t+1)^2 square; recall the same the other way.
    Two empty maps score 1.0; one empty map 0.0.
    """
    p, t = _binary(pred), _binary(target)
    if p.shape != t.shape:
        raise ValueError(f"edge maps differ in shape: {p.shape} vs {t.shape}")
    n_p, n_t = int(p.sum()), int(t.sum())
    if n_p == 0 and n_t == 0:
        return 1.0
    if n_p == 0 or n_t == 0:
        return 0.0
    precision = float((p & _dilate(t, tolerance)).sum()) / n_p
    recall = float((t & _dilate(p, tolerance)).sum()) / n_t
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
