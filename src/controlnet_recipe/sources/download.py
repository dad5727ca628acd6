"""Resumable, checksummed downloads with the standard library (urllib) and a tqdm progress bar.

Bytes go to ``<dest>.part``; an interrupted download continues from there with an HTTP Range request
(a server that ignores Range and answers 200 makes it start again from zero). The finished file is
checked against ``sha256`` and only then renamed to ``dest``, so ``dest`` is always complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..core.errors import BadInput
from ..core.logs import progress

USER_AGENT = "controlnet-recipe"
TIMEOUT_S = 60


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _hasher(part: Path, chunk_size: int):
    """A sha256 already fed with the bytes of the partial file, so they are not read again at the end."""
    h = hashlib.sha256()
    if part.exists():
        with open(part, "rb") as f:
            while chunk := f.read(chunk_size):
                h.update(chunk)
    return h


def _fetch(url: str, part: Path, chunk_size: int, sha256: str | None):
    """Append the rest of ``url`` to ``part``; returns the sha256 hasher of the whole file (or None)."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        # Range not satisfiable: the part is already complete, or longer than the file (start again).
        m = re.match(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
        if m and int(m.group(1)) == offset:
            return _hasher(part, chunk_size) if sha256 else None
        part.unlink()
        return _fetch(url, part, chunk_size, sha256)
    with resp:
        status = getattr(resp, "status", None)
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if status == 206 and m and int(m.group(1)) == offset:
            mode = "ab"
        else:  # 200 (Range ignored), or a range that does not start where we are: start from zero
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length else None
        h = (_hasher(part, chunk_size) if mode == "ab" else hashlib.sha256()) if sha256 else None
        bar = progress(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5])
        with bar, open(part, mode) as f:
            while chunk := resp.read(chunk_size):
                f.write(chunk)
                if h is not None:
                    h.update(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise http.client.IncompleteRead(b"", total - part.stat().st_size)
    return h


def download(url: str, dest: Path, sha256: str | None = None, chunk_size: int = 1 << 20, retries: int = 3) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify ``sha256``, rename atomically.

    Returns at once when ``dest`` exists and matches ``sha256`` (or no digest is given). A digest
    mismatch deletes the download and raises ``ValueError``. Connection errors are retried
    ``retries`` times, each retry resuming where the last one stopped.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    if dest.is_file():
        if expected is None or sha256_file(dest, chunk_size) == expected:
            return dest
        dest.unlink()  # a stale or corrupt file: download it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    for attempt in range(retries + 1):
        try:
            h = _fetch(url, part, chunk_size, expected)
            break
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == retries:
                raise
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError):
            if attempt == retries:
                raise
        time.sleep(min(2**attempt, 30))
    if expected is not None:
        actual = h.hexdigest()
        if actual != expected:
            part.unlink(missing_ok=True)
            raise BadInput(f"{dest.name}: sha256 mismatch: expected {expected}, got {actual} (download deleted)")
    os.replace(part, dest)
    return dest
