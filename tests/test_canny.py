"""The Canny-edge condition and the edge F1 score."""

from __future__ import annotations

import numpy as np
from PIL import Image

from controlnet_recipe.conditions.canny import canny, edge_f1
from controlnet_recipe.faces.synthetic import make_face


def test_canny_of_a_face_is_white_edges_on_black():
    img = make_face(0, 64)[0]
    out = canny(img)
    assert out.mode == "RGB" and out.size == img.size
    arr = np.asarray(out)
    assert set(np.unique(arr)) <= {0, 255}
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert 0 < (arr[..., 0] == 255).mean() < 0.5


def test_canny_accepts_other_modes_and_thresholds():
    img = make_face(1, 64)[0]
    assert canny(img.convert("L")).mode == "RGB"
    assert canny(img.convert("RGBA")).size == img.size
    loose, strict = ((np.asarray(canny(img, lo, hi))[..., 0] > 0).sum() for lo, hi in ((20, 60), (200, 400)))
    assert loose >= strict


def _line(x: int, size: int = 32) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[4:28, x] = 255
    return m


def test_edge_f1():
    a = _line(10)
    assert edge_f1(a, a) == 1.0
    assert edge_f1(a, _line(25), tolerance=1) == 0.0
    shifted = _line(11)
    assert edge_f1(a, shifted, tolerance=0) == 0.0
    assert edge_f1(a, shifted, tolerance=1) == 1.0
    # half the line shifted: partly right without tolerance, all right with it
    half = a.copy()
    half[16:28, 10] = 0
    half[16:28, 11] = 255
    assert 0.0 < edge_f1(a, half, tolerance=0) < 1.0
    assert edge_f1(a, half, tolerance=1) == 1.0


def test_edge_f1_inputs():
    edges = np.asarray(canny(make_face(2, 64)[0]))
    assert edge_f1(edges, edges[..., 0] > 0) == 1.0  # RGB 0/255 vs bool
    assert edge_f1(np.zeros((8, 8)), np.zeros((8, 8))) == 1.0
    assert edge_f1(np.zeros((8, 8)), np.ones((8, 8))) == 0.0
    assert edge_f1(Image.fromarray(edges), edges) == 1.0
