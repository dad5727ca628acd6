"""decode_image: every bad-file case gives its reason; other modes become RGB with `converted` set."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet_recipe.core.images import REASONS, Decoded, decode_image, encode_png
from controlnet_recipe.faces.synthetic import make_face


@pytest.fixture(scope="module")
def face() -> Image.Image:
    return make_face(1, 32)[0]


def _bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_good_rgb_passes_unchanged(face, tmp_path: Path):
    path = tmp_path / "face.png"
    path.write_bytes(encode_png(face))
    for source in (path, str(path), path.read_bytes(), face):
        d = decode_image(source)
        assert d == Decoded(d.image, None, None) and d.ok
        assert d.image.mode == "RGB" and d.image.size == (32, 32)
        assert np.array_equal(np.asarray(d.image), np.asarray(face))


def test_truncated_png(face, tmp_path: Path):
    data = encode_png(face)
    assert decode_image(data[: len(data) // 2]).reason == "truncated"
    assert decode_image(data[:40]).reason == "truncated"  # cut inside the header: PIL cannot even identify it
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert decode_image(tmp_path / "cut.png") == Decoded(None, "truncated")


def test_truncated_jpeg(face):
    data = _bytes(face, "JPEG")
    assert decode_image(data[: len(data) // 2]).reason == "truncated"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: None, "missing_file"),
        (lambda p: p.write_bytes(b""), "empty_file"),
        (lambda p: p.write_text("this is not an image\n"), "not_an_image"),
        (lambda p: Image.new("RGB", (1, 1), "red").save(p), "too_small"),
        (lambda p: Image.new("RGB", (64, 4)).save(p), "too_small"),
        (lambda p: p.mkdir(), "missing_file"),  # a folder named like an image
    ],
)
def test_bad_files(tmp_path: Path, make, reason):
    path = tmp_path / "x.png"
    make(path)
    d = decode_image(path)
    assert d.reason == reason and d.image is None and not d.ok
    assert reason in REASONS


def test_bad_bytes():
    assert decode_image(b"").reason == "empty_file"
    assert decode_image(b"GIF89a garbage").reason == "unreadable"  # an image signature, then nonsense
    png = _bytes(Image.new("RGB", (16, 16)))
    corrupt = png[:40] + bytes(b ^ 0xFF for b in png[40:-12]) + png[-12:]  # complete but scrambled
    assert decode_image(corrupt).reason == "unreadable"


def test_min_size(face):
    assert decode_image(face, min_size=33).reason == "too_small"
    assert decode_image(encode_png(face), min_size=32).ok


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("CMYK", "JPEG"), ("CMYK", "TIFF"), ("L", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG")],
)
def test_converted_to_rgb(face, mode, fmt):
    data = _bytes(face.convert(mode), fmt)
    d = decode_image(data)
    assert d.ok and d.reason is None and d.converted == mode
    assert d.image.mode == "RGB" and d.image.size == face.size
    if fmt != "JPEG":  # lossless: the content survives the round trip
        diff = np.abs(np.asarray(d.image, dtype=int) - np.asarray(face.convert(mode).convert("RGB"), dtype=int))
        assert diff.mean() < 2


def test_16bit_grayscale_png(tmp_path: Path):
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    d = decode_image(path)
    assert d.converted == "I;16" and d.image.mode == "RGB"
    arr = np.asarray(d.image)
    assert arr.dtype == np.uint8 and arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255  # scaled, not clipped


def test_rgba_alpha_on_black(tmp_path: Path):
    img = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    d = decode_image(_bytes(img))
    assert d.converted == "RGBA" and np.asarray(d.image).max() == 0


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    d = decode_image(buf.getvalue())
    assert d.ok and d.image.size == (20, 40)


def test_encode_png_round_trip(face):
    assert decode_image(encode_png(face)).image.tobytes() == face.tobytes()
