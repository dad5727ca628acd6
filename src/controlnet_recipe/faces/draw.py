"""Landmarks (68 points, iBUG 300-W layout) to face parts, and face parts to a segmentation map.

The same part geometry serves the synthetic renderer and the condition drawing, so a condition
drawn from detected landmarks on a real photo looks exactly like one drawn from ground truth.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# iBUG 300-W index ranges (0-based).
JAW = list(range(0, 17))
RIGHT_BROW = list(range(17, 22))  # the subject's right, left in the image
LEFT_BROW = list(range(22, 27))
NOSE_BRIDGE = list(range(27, 31))
NOSE_LOWER = list(range(31, 36))
RIGHT_EYE = list(range(36, 42))
LEFT_EYE = list(range(42, 48))
OUTER_LIP = list(range(48, 60))
INNER_LIP = list(range(60, 68))
NUM_LANDMARKS = 68

# Segmentation classes, in drawing order after the background. Each gets its own colour.
PARTS = (
    "background",
    "skin",
    "nose",
    "right_brow",
    "left_brow",
    "right_eye",
    "left_eye",
    "upper_lip",
    "lower_lip",
    "inner_mouth",
)
PALETTE = np.array(
    [
        (0, 0, 0),
        (255, 204, 153),
        (255, 128, 0),
        (0, 255, 0),
        (0, 160, 64),
        (0, 128, 255),
        (0, 0, 255),
        (255, 0, 128),
        (255, 0, 255),
        (255, 255, 0),
    ],
    dtype=np.uint8,
)


def _pts(lm: np.ndarray, idx: list[int]) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in lm[idx]]


def face_scale(lm: np.ndarray) -> float:
    """Inter-ocular distance (outer eye corners), the usual landmark normaliser."""
    return float(np.linalg.norm(lm[36] - lm[45]))


def head_top(lm: np.ndarray, n: int = 12) -> list[tuple[float, float]]:
    """The forehead: a half-ellipse from the left temple (16) over the brows to the right (0)."""
    centre = (lm[0] + lm[16]) / 2
    side = (lm[16] - lm[0]) / 2
    up = np.array([side[1], -side[0]])
    up /= np.linalg.norm(up) + 1e-8
    if np.dot(lm[[19, 24]].mean(0) - lm[8], up) < 0:
        up = -up
    height = max(np.dot(lm[[19, 24]].mean(0) - centre, up), 0.0) * 1.8 + 0.15 * np.linalg.norm(side)
    t = np.linspace(0, np.pi, n + 2)[1:-1]
    return [tuple(float(v) for v in centre + side * np.cos(a) + up * height * np.sin(a)) for a in t]


def part_shapes(lm: np.ndarray) -> dict[str, tuple[str, list[tuple[float, float]]]]:
    """Each part as ("polygon", points) or ("line", points), in image coordinates."""
    lm = np.asarray(lm, dtype=np.float64)
    return {
        "skin": ("polygon", _pts(lm, JAW) + head_top(lm)),
        "nose": ("polygon", _pts(lm, [27]) + _pts(lm, NOSE_LOWER)),
        "right_brow": ("line", _pts(lm, RIGHT_BROW)),
        "left_brow": ("line", _pts(lm, LEFT_BROW)),
        "right_eye": ("polygon", _pts(lm, RIGHT_EYE)),
        "left_eye": ("polygon", _pts(lm, LEFT_EYE)),
        "upper_lip": ("polygon", _pts(lm, list(range(48, 55))) + _pts(lm, [64, 63, 62, 61, 60])),
        "lower_lip": ("polygon", _pts(lm, list(range(54, 60)) + [48]) + _pts(lm, [60, 67, 66, 65, 64])),
        "inner_mouth": ("polygon", _pts(lm, INNER_LIP)),
    }


def brow_width(lm: np.ndarray) -> float:
    return max(1.0, 0.09 * face_scale(lm))


def draw_parts(draw: ImageDraw.ImageDraw, lm: np.ndarray, fill: dict[str, object]) -> None:
    """Draw every part named in ``fill`` with its fill value, in PARTS order."""
    shapes = part_shapes(lm)
    width = max(1, round(brow_width(lm)))
    for name in PARTS[1:]:
        if name not in fill:
            continue
        kind, pts = shapes[name]
        if kind == "polygon":
            draw.polygon(pts, fill=fill[name])
        else:
            draw.line(pts, fill=fill[name], width=width, joint="curve")


def draw_label_map(landmarks: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Class-index map (H, W) uint8 for one or more faces."""
    img = Image.new("L", size, 0)
    d = ImageDraw.Draw(img)
    for lm in landmarks:
        draw_parts(d, lm, {name: i for i, name in enumerate(PARTS) if i > 0})
    return np.asarray(img)


def draw_segmentation(landmarks: list[np.ndarray], size: tuple[int, int]) -> Image.Image:
    """The conditioning image: each face part filled with its own colour on black."""
    return Image.fromarray(PALETTE[draw_label_map(landmarks, size)])


def labels_from_segmentation(img: Image.Image | np.ndarray) -> np.ndarray:
    """Invert :func:`draw_segmentation`: nearest palette colour per pixel."""
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.int32)
    dist = ((arr[:, :, None, :] - PALETTE[None, None].astype(np.int32)) ** 2).sum(-1)
    return dist.argmin(-1).astype(np.uint8)


def _bump(h: int, w: int, centre: np.ndarray, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma**2))


def draw_depth(landmarks: list[np.ndarray], size: tuple[int, int]) -> Image.Image:
    """A depth-like shading of each face (near is bright, the background black): the head a dome
    over the skin, the nose raised, the eye sockets and the mouth set back. A continuous map, made
    exactly from the landmarks."""
    w, h = size
    depth = np.zeros((h, w), dtype=np.float64)
    for lm in landmarks:
        lm = np.asarray(lm, dtype=np.float64)
        skin = draw_label_map([lm], size) > 0
        if not skin.any():
            continue
        ys, xs = np.nonzero(skin)
        cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
        rx, ry = max((xs.max() - xs.min()) / 2, 1.0), max((ys.max() - ys.min()) / 2, 1.0)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        dome = np.sqrt(np.clip(1 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2, 0, 1))
        s = face_scale(lm)
        face = 0.25 + 0.45 * dome + 0.3 * _bump(h, w, lm[30], 0.14 * s)
        for eye in (RIGHT_EYE, LEFT_EYE):
            face -= 0.12 * _bump(h, w, lm[eye].mean(0), 0.12 * s)
        face -= 0.08 * _bump(h, w, lm[INNER_LIP].mean(0), 0.12 * s)
        depth = np.where(skin, np.maximum(depth, np.clip(face, 0, 1)), depth)
    grey = (depth * 255).round().astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1))


def draw_outline(landmarks: list[np.ndarray], size: tuple[int, int]) -> Image.Image:
    """Each face part's outline, one pixel wide, white on black: a binary line map."""
    img = Image.new("RGB", size, (0, 0, 0))
    d = ImageDraw.Draw(img)
    for lm in landmarks:
        for kind, pts in part_shapes(lm).values():
            d.line(pts + pts[:1] if kind == "polygon" else pts, fill=(255, 255, 255), width=1)
    return img
