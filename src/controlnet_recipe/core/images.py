"""Robust image decoding: any input (bytes, path, PIL image) to an 8-bit RGB image, or a reason why not.

Real datasets hold broken files: cut-short downloads, empty files, text saved as ``.png``, 1x1
tracking pixels, CMYK JPEGs, 16-bit PNGs. :func:`decode_image` never raises; it names the problem
with one of :data:`REASONS`, so that a stage can skip bad files and count them by reason.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .buckets import cover, fit_to_bucket

REASONS = ("missing_file", "empty_file", "not_an_image", "truncated", "too_small", "unreadable")
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Decoded:
    """The result of :func:`decode_image`: an RGB image, or ``None`` and the reason it was skipped."""

    image: Image.Image | None
    reason: str | None = None  # why skipped: one of REASONS
    converted: str | None = None  # the original mode when it was converted to RGB

    @property
    def ok(self) -> bool:
        return self.image is not None


def _read(path: str | os.PathLike) -> bytes | Decoded:
    try:
        if not os.path.isfile(path):
            return Decoded(None, "broken_link" if os.path.islink(path) else "missing_file")
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return Decoded(None, "unreadable")


SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _cut_short(data: bytes) -> bool:
    """True when the bytes start like a PNG or JPEG but lack its end marker (an interrupted write or download)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" not in data[-32:]
    if data.startswith(b"\xff\xd8\xff"):
        return b"\xff\xd9" not in data[-1024:]
    return False


def _from_pil(img: Image.Image, min_size: int) -> Decoded:
    if min(img.size) < min_size:
        return Decoded(None, "too_small")
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    if orientation != 1:  # as datasets' Image feature does: phone photos are stored sideways
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return Decoded(img)
    return Decoded(to_rgb(img), converted=img.mode)


def decode_image(data: bytes | str | os.PathLike | Image.Image, min_size: int = 8) -> Decoded:
    """Decode ``data`` fully into an RGB image; never raises. Non-RGB modes are converted with
    :func:`to_rgb` and ``converted`` names the original mode."""
    if isinstance(data, Image.Image):
        try:
            data.load()
            return _from_pil(data, min_size)
        except Exception as e:
            return Decoded(None, "truncated" if "truncated" in str(e).lower() else "unreadable")
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
    else:
        data = _read(data)
        if isinstance(data, Decoded):
            return data
    if not data:
        return Decoded(None, "empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if min(img.size) < min_size:
                return Decoded(None, "too_small")
            img.load()  # decode every pixel now: a truncated file fails here, not later in a worker
        return _from_pil(img, min_size)
    except UnidentifiedImageError:
        if _cut_short(data):
            return Decoded(None, "truncated")
        return Decoded(None, "unreadable" if _looks_like_image(data) else "not_an_image")  # a corrupt header
    except (OSError, EOFError, SyntaxError, ValueError) as e:
        truncated = _cut_short(data) or isinstance(e, EOFError) or "truncated" in str(e).lower()
        return Decoded(None, "truncated" if truncated else "unreadable")
    except Exception:  # DecompressionBombError/Warning, plugin bugs, ...
        return Decoded(None, "unreadable")


def encode_png(img: Image.Image, compress_level: int = 1) -> bytes:
    """PNG bytes of ``img`` (lossless; fast compression by default)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, L, CMYK, I;16, P) to 8-bit RGB; alpha composited on black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def resize_and_crop(w: int, h: int, resolution: int) -> tuple[int, int, int, int]:
    """How :func:`images_to_tensor` fits a ``w`` x ``h`` image: the resized (width, height), then
    the centre crop's (left, top) in the resized image (SDXL's crop conditioning)."""
    crop = cover(w, h, (resolution, resolution))
    return *crop.resized, crop.left, crop.top


def images_to_tensor(images: list[Image.Image], size: int | tuple[int, int], normalize: bool = True):
    """(N, 3, H, W) float tensor: resize + centre crop as upstream, to ``size`` (a square side, or a
    bucket's (width, height)); [-1, 1] if ``normalize`` (target images), else [0, 1] (conditioning images)."""
    import torch

    bucket = (size, size) if isinstance(size, int) else tuple(size)
    out = []
    for img in images:
        img = to_rgb(img)
        if img.size != bucket:
            img = fit_to_bucket(img, cover(*img.size, bucket))
        out.append(np.asarray(img, dtype=np.float32) / 255.0)
    t = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    return t * 2 - 1 if normalize else t


def tensor_to_images(t) -> list[Image.Image]:
    """Inverse of :func:`images_to_tensor` for [-1, 1] tensors."""
    arr = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
