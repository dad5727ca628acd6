"""What a condition map *is*, and so how it is learned and scored: categorical (a palette of
classes), binary (lines, edges, outlines on a background) or continuous (depth, shading).

A :class:`MapType` turns condition images into an extractor's training targets, the extractor's
output back into maps, and a pair of maps into the scores that fit the type. A condition module
knows its type (the face palette, Canny's edges); for conditions the user brings, :func:`discover`
reads it from the training conditions and says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..core.buckets import cover, fit_to_bucket
from ..metrics.maps import f1, miou, rmse, ssim

MapKind = Literal["categorical", "binary", "continuous"]
MAX_CLASSES = 32  # more colours than this is a continuous map
MIN_SHARE = 2e-4  # a colour on fewer pixels than this is noise (antialiasing, compression), not a class
COVERAGE = 0.98  # the classes cover at least this share of pixels
BACKGROUND_SHARE = 0.4  # a categorical map's most common colour, above this share, is its background


@dataclass(frozen=True)
class MapType:
    """``palette``: a colour per class (categorical and binary: the background first, then the
    line colour); ``ignore``: the class left out of mIoU (an easy background); ``why``: how the type
    was chosen, for the report."""

    kind: MapKind
    palette: tuple[tuple[int, int, int], ...] = ()
    names: tuple[str, ...] = ()
    ignore: int | None = None
    why: str = ""
    headline: str = field(init=False)

    def __post_init__(self):
        head = {"categorical": "extractor_miou", "binary": "extractor_f1", "continuous": "extractor_ssim"}[self.kind]
        object.__setattr__(self, "headline", head)

    # -- learning -------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        """The extractor's output channels: one logit per class, or the map's RGB."""
        return 3 if self.kind == "continuous" else len(self.palette)

    def targets(self, conditions: list, resolution: int | tuple[int, int]) -> torch.Tensor:
        """(N, H, W) class indices, or (N, 3, H, W) values in [0, 1] for continuous maps, at
        ``resolution`` (a square side or a (width, height)), fitted as the images are (resized to
        cover, centre-cropped; nearest: classes stay pure)."""
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        arrs = np.stack([np.asarray(fit_to_bucket(c.convert("RGB"), cover(*c.size, size), resample=0)) for c in conditions])
        if self.kind == "continuous":
            return torch.from_numpy(arrs).permute(0, 3, 1, 2).float() / 255
        return torch.from_numpy(self.labels(arrs)).long()

    def labels(self, rgb: np.ndarray) -> np.ndarray:
        """Nearest palette colour of each pixel of (..., 3) uint8 maps."""
        pal = np.asarray(self.palette, dtype=np.int32)
        dist = ((rgb[..., None, :].astype(np.int32) - pal) ** 2).sum(-1)
        return dist.argmin(-1).astype(np.uint8)

    def loss(self, out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "continuous":
            return F.l1_loss(out.sigmoid(), target)
        return F.cross_entropy(out, target, weight=weight)

    def class_weight(self, target: torch.Tensor) -> torch.Tensor | None:
        """Small classes (eyes, lips, thin lines) matter as much as large ones: inverse sqrt frequency."""
        if self.kind == "continuous":
            return None
        freq = torch.bincount(target.ravel(), minlength=self.channels).float() + 1
        weight = (freq.sum() / freq).sqrt()
        return weight / weight.mean()

    def decode(self, out: torch.Tensor) -> np.ndarray:
        """Extractor output -> (N, H, W) classes or (N, H, W, 3) values in [0, 1]."""
        if self.kind == "continuous":
            return out.sigmoid().permute(0, 2, 3, 1).numpy()
        return out.argmax(1).numpy()

    # -- scoring ---------------------------------------------------------------------------------
    def score(self, pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
        """One image's agreement with its condition; the first key is the headline."""
        if self.kind == "categorical":
            return {"extractor_miou": miou(pred, target, len(self.palette), self.ignore)}
        if self.kind == "binary":
            return {"extractor_f1": f1(pred == 1, target == 1)}
        return {"extractor_ssim": ssim(pred, target), "extractor_rmse": rmse(pred, target)}

    def metric_why(self) -> str:
        return {
            "categorical": f"mIoU over the condition's {len(self.palette)} classes"
            + (" (its background left out)" if self.ignore is not None else ""),
            "binary": "F1 of the line pixels, matched within 1 pixel",
            "continuous": "SSIM of the map (RMSE beside it)",
        }[self.kind]

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("headline")
        return d

    @classmethod
    def from_json(cls, d: dict) -> MapType:
        return cls(**{**d, "palette": tuple(tuple(c) for c in d["palette"]), "names": tuple(d["names"])})


def binary_palette(rgb: np.ndarray) -> tuple[tuple[int, int, int], ...]:
    """Two colours, the most common (the background) first."""
    colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    top = colours[np.argsort(-counts)[:2]]
    return tuple(tuple(int(v) for v in c) for c in top)


def discover(conditions: list, resolution: int) -> MapType:
    """The type of maps the user brought, from their colours: a few colours (each on at least
    MIN_SHARE of the pixels, together nearly all of them) are classes, two of them lines on a
    background; anything else (many grey levels, gradients) is continuous."""
    rgb = np.stack([np.asarray(c.convert("RGB").resize((resolution, resolution), 0)) for c in conditions])
    colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    order = np.argsort(-counts)
    share = counts[order] / counts.sum()
    k = int((share >= MIN_SHARE).sum())
    covered = float(share[:k].sum())
    seen = f"{len(colours)} colours in {len(conditions)} training conditions, {k} of them on {covered:.1%} of pixels"
    palette = tuple(tuple(int(v) for v in colours[i]) for i in order[:k])
    if covered < COVERAGE or k > MAX_CLASSES:
        return MapType("continuous", why=f"continuous: {seen} (not a palette of at most {MAX_CLASSES})")
    if k <= 2:
        if len(palette) < 2:
            palette = (*palette, tuple(255 - v for v in palette[0]))
        return MapType("binary", palette, ("background", "line"), why=f"binary: {seen}")
    ignore = 0 if share[0] > BACKGROUND_SHARE else None
    names = tuple(f"class {i}" for i in range(k))
    bg = f"; the most common ({share[0]:.0%} of pixels) is the background" if ignore is not None else ""
    return MapType("categorical", palette, names, ignore, why=f"categorical: {seen}{bg}")
