"""Aspect-ratio buckets: the sizes images are trained at when ``data.buckets`` is on.

A bucket is a (width, height) in pixels, both multiples of what the base's VAE and denoiser need
(:func:`controlnet_recipe.models.families.size_multiple`). ``auto`` makes buckets of about the
recipe's pixel count (``resolution``²) for every aspect up to ``max_aspect``:1, as kohya's and
SimpleTuner's do. Each image goes to the bucket nearest its aspect (in log ratio) and is resized
to cover it, then centre-cropped by the least amount; its condition and landmarks get exactly the
same resize and crop (:func:`fit_to_bucket`, :func:`move_points`), so they stay aligned to the pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

Bucket = tuple[int, int]  # (width, height) in pixels
SKIP_ASPECT = "extreme_aspect"  # longer than max_aspect:1
SKIP_SMALL = "smaller_than_buckets"  # fewer pixels than the smallest bucket


def name(bucket: Bucket) -> str:
    """``WxH``: a bucket's name in reports, params and the cache's splits."""
    return f"{bucket[0]}x{bucket[1]}"


def parse(text: str) -> Bucket:
    w, sep, h = str(text).lower().partition("x")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit() or not int(w) or not int(h):
        raise ValueError(f"data.buckets: {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 512x768")
    return int(w), int(h)


def auto_buckets(resolution: int, multiple: int, max_aspect: float) -> list[Bucket]:
    """Every (w, h) with sides multiples of ``multiple``, as many pixels as fit in ``resolution``²
    for its width, and an aspect of at most ``max_aspect``; both orientations; sorted by aspect."""
    area = resolution * resolution
    out: set[Bucket] = set()
    side = max(multiple, resolution // multiple * multiple)
    for w in range(side, 0, -multiple):
        h = area // w // multiple * multiple
        if h < multiple or max(w, h) / min(w, h) > max_aspect:
            continue
        out |= {(w, h), (h, w)}
    return sorted(out, key=lambda b: b[0] / b[1])


def bucket_list(spec: str | list[str], resolution: int, multiple: int, max_aspect: float) -> list[Bucket] | None:
    """The recipe's buckets: None for ``off``; ``auto``'s; or the stated ``WxH`` list (a side that
    is no multiple of ``multiple`` raises ValueError naming it)."""
    if spec == "off":
        return None
    if spec == "auto":
        return auto_buckets(resolution, multiple, max_aspect)
    buckets = [parse(s) for s in spec]
    for b in buckets:
        if b[0] % multiple or b[1] % multiple:
            why = f"expected sides that are multiples of {multiple} (the base's VAE and denoiser)"
            raise ValueError(f"data.buckets: {name(b)}: {why}")
    return sorted(set(buckets), key=lambda b: b[0] / b[1])


def nearest(w: int, h: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect is nearest the image's (in log ratio; ties: the larger bucket)."""
    target = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def skip_reason(w: int, h: int, buckets: list[Bucket], max_aspect: float) -> str | None:
    """Why an image of ``w`` x ``h`` cannot be trained in these buckets, or None."""
    if max(w, h) / min(w, h) > max_aspect:
        return SKIP_ASPECT
    if w * h < min(b[0] * b[1] for b in buckets):
        return SKIP_SMALL
    return None


@dataclass(frozen=True)
class Crop:
    """Resize a (w, h) image to ``resized``, then crop the box at ``left``, ``top`` of ``bucket``'s size."""

    resized: tuple[int, int]
    left: int
    top: int
    bucket: Bucket

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.left + self.bucket[0], self.top + self.bucket[1]


def cover(w: int, h: int, bucket: Bucket) -> Crop:
    """The least resize that covers ``bucket``, and the centre crop to it (square buckets: exactly
    what :func:`controlnet_recipe.core.images.resize_and_crop` has always done)."""
    bw, bh = bucket
    s = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * s)), max(bh, round(h * s))
    return Crop((rw, rh), (rw - bw) // 2, (rh - bh) // 2, bucket)


def fit_to_bucket(
    img: Image.Image, crop: Crop, source_size: tuple[int, int] | None = None, resample: int = Image.BICUBIC
) -> Image.Image:
    """``img`` resized (bicubic; a map of classes: ``Image.NEAREST``) and cropped by ``crop``.
    ``source_size``: the size ``crop`` was made for, when ``img`` has another (a condition given
    at another resolution is first brought to it)."""
    if source_size is not None and img.size != source_size:
        img = img.resize(source_size, resample)
    if img.size != crop.resized:
        img = img.resize(crop.resized, resample)
    return img.crop(crop.box) if img.size != crop.bucket else img


def move_points(points, size: tuple[int, int], crop: Crop):
    """(..., 2) pixel coordinates in an image of ``size`` -> the same points in its crop."""
    import numpy as np

    p = np.asarray(points, dtype=np.float32)
    scale = np.array([crop.resized[0] / size[0], crop.resized[1] / size[1]], dtype=np.float32)
    return p * scale - np.array([crop.left, crop.top], dtype=np.float32)


def largest(buckets: list[Bucket]) -> Bucket:
    """The bucket with the most pixels (the planner plans its step; ties: the squarest, then the wider)."""
    return max(buckets, key=lambda b: (b[0] * b[1], -abs(math.log(b[0] / b[1])), b[0]))
