"""Microsoft FaceSynthetics: ``000000.png`` (RGB render), ``000000_seg.png`` (ignored) and
``000000_ldmks.txt`` (70 lines ``x y``: the 68 iBUG points, then the two pupils) per sample.

``spec.location`` is an http(s) URL of the zip (downloaded into ``spec.cache_dir``), a local zip,
or the extracted folder. Files may sit inside a top folder. Zip members are read one at a time.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import numpy as np

from ..core.errors import MissingInput
from . import SourceRow, SourceSpec
from .download import download

RENDER = re.compile(r"^(\d{6,})\.png$")
NUM_POINTS = 68  # iBUG 300-W; the two pupil points that follow are dropped


def parse_landmarks(text: str | None) -> np.ndarray | None:
    """The first 68 points of a FaceSynthetics ``_ldmks.txt`` as (68, 2) float32, or None if the file is
    missing or has fewer than 68 valid ``x y`` lines."""
    if text is None:
        return None
    lines = [ln for ln in text.splitlines() if ln.strip()][:NUM_POINTS]
    if len(lines) < NUM_POINTS:
        return None
    try:
        pts = np.array([[float(v) for v in ln.split()] for ln in lines], dtype=np.float32)
    except ValueError:
        return None
    if pts.shape != (NUM_POINTS, 2) or not np.isfinite(pts).all():
        return None
    return pts


def _local_archive(spec: SourceSpec) -> Path:
    """The zip or folder for ``spec.location``, downloading it first if it is a URL."""
    url = urlparse(spec.location)
    if url.scheme in ("http", "https"):
        name = unquote(PurePosixPath(url.path).name) or "facesynthetics.zip"
        return download(spec.location, Path(spec.cache_dir) / name, sha256=spec.sha256)
    path = Path(spec.location)
    if not path.exists():
        raise MissingInput(f"{path}: no FaceSynthetics zip or folder here")
    return path


def _rows(
    renders: dict[str, str], names: set[str], read: Callable[[str], bytes], image: Callable[[str], bytes | str], spec: SourceSpec
) -> Iterator[SourceRow]:
    """``renders``: sample id -> member/path of its render; ``names``: every member, to find ldmks files;
    ``image``: what a row carries for a render (bytes from a zip, a path in a folder)."""
    for sid in sorted(renders):
        render = renders[sid]
        landmarks, problem = None, None
        if spec.use_landmarks:
            ldmks = render[: -len(".png")] + "_ldmks.txt"
            text = read(ldmks).decode("utf-8", "replace") if ldmks in names else None
            landmarks = parse_landmarks(text)
            problem = None if landmarks is not None else "bad_landmarks"
        yield SourceRow(id=sid, image=image(render), landmarks=landmarks, problem=problem)


def _index(names: list[str]) -> dict[str, str]:
    renders: dict[str, str] = {}
    for name in names:
        m = RENDER.match(PurePosixPath(name).name)
        if m and not PurePosixPath(name).name.startswith("._"):
            renders.setdefault(m.group(1), name)  # first wins if two top folders hold the same id
    return renders


def read(spec: SourceSpec) -> Iterator[SourceRow]:
    """FaceSynthetics rows, ids ``000000``... in order: image bytes (zip) or path (folder), and the
    ground-truth landmarks if ``use_landmarks``."""
    path = _local_archive(spec)
    if path.is_dir():
        names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.name.endswith((".png", "_ldmks.txt")))
        yield from _rows(_index(names), set(names), lambda n: (path / n).read_bytes(), lambda n: str(path / n), spec)
        return
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if not n.endswith("/") and "__MACOSX" not in n)
        yield from _rows(_index(names), set(names), zf.read, zf.read, spec)
