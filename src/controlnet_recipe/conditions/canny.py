"""``canny``: OpenCV Canny edges (as lllyasviel's canny ControlNet), white on black. Its fidelity:
Canny run again on the generated image, F1 of the edges against the condition's."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ..core.images import to_rgb
from ..metrics.maps import f1
from .condition import Condition, Fidelity, Made
from .maps import MapType

BLACK, WHITE = (0, 0, 0), (255, 255, 255)


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


def edge_f1(pred: np.ndarray | Image.Image, target: np.ndarray | Image.Image, tolerance: int = 1) -> float:
    """F1 between two edge maps (bool, 0/1, or 0/255; HxW or HxWx3), matching within ``tolerance`` pixels."""
    return f1(_binary(pred), _binary(target), tolerance)


class Canny(Condition):
    name = "canny"
    photo_hint = "its Canny edges"

    def make(self, image, row: dict) -> Made:
        return Made(canny(image, self.c.canny_low, self.c.canny_high), None, row.get("landmarks"))

    def report(self) -> dict:
        return {"kind": self.name, "canny_low": self.c.canny_low, "canny_high": self.c.canny_high}

    def map_type(self, conditions: list, resolution: int) -> MapType:
        return MapType("binary", (BLACK, WHITE), ("background", "edge"), why="binary: Canny's white edges on black")

    def fidelity(self, r, folder, extractor) -> Fidelity:
        return CannyFidelity(self.c.canny_low, self.c.canny_high)


class CannyFidelity(Fidelity):
    headline = "edge_f1"
    why = "F1 of Canny's edges on the image against the condition's, matched within 1 pixel"

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def scores(self, images: list, conditions: list, targets: list) -> dict[str, np.ndarray]:
        return {
            "edge_f1": np.array(
                [
                    edge_f1(canny(im, self.low, self.high), np.asarray(c.convert("L").resize(im.size, 0)))
                    for im, c in zip(images, conditions)
                ]
            )
        }
