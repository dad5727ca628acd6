"""A folder of images (searched recursively), with captions and optional conditioning images.

- Captions: a side file with the image's stem and ``.txt``, else ``metadata.jsonl`` (or ``metadata.csv``)
  in the image's folder or any folder above it, as datasets' imagefolder: ``file_name`` relative to that
  metadata file, plus ``text`` or ``caption`` (or a field that ``spec.columns`` maps to ``caption``).
- Conditioning images: a parallel folder, ``spec.columns["conditioning_folder"]``, holding the same
  relative file names (any image extension), or a metadata field ``conditioning_image_file_name`` (or one
  that ``spec.columns`` maps to ``conditioning_image``). This is the "two image columns" case that
  upstream's imagefolder loader cannot hold (https://github.com/huggingface/diffusers/issues/2772,
  https://github.com/huggingface/diffusers/issues/6077). A missing one gives ``problem="missing_conditioning"``.

Rows carry file paths, not bytes; ids are the relative paths (posix), in sorted order.

The walk never stops on an odd entry: symbolic links are followed once (a loop is an entry, not a
hang), and a symlink loop, a special file (FIFO, socket, device), a folder that cannot be listed
and a name that is not UTF-8 each become a row with ``skip`` set to the reason, which the data
stage counts. A link to nothing is listed as an image and counted when it cannot be read.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import BadInput, MissingInput
from ..core.text import UNREADABLE, Text, decode_text
from . import SourceRow, SourceSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_FIELDS = ("text", "caption")
CONDITIONING_FIELDS = ("conditioning_image_file_name", "conditioning_file_name")


def printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by Python as surrogates) shown escaped."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def walk(root: Path) -> tuple[list[str], dict[str, str]]:
    """(regular files and links to them, as posix paths relative to ``root``, sorted; the entries
    that are no file, relative path -> reason). Links to folders are followed, each real folder
    once; nothing here raises for an odd entry."""
    files: list[str] = []
    odd: dict[str, str] = {}
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path, rel: str) -> None:
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            odd[(rel or ".") + "/"] = "unreadable_folder"
            return
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                odd[printable(name)] = "name_not_utf8"
                continue
            try:
                st = os.stat(entry.path)  # follows links
            except OSError as e:
                if e.errno == errno.ELOOP:
                    odd[name] = "symlink_loop"
                elif entry.is_symlink():  # a link to nothing: listed, counted when it cannot be read
                    files.append(name)
                else:
                    odd[name] = "unreadable_entry"
                continue
            if stat.S_ISDIR(st.st_mode):
                visit(Path(entry.path), name)
            elif stat.S_ISREG(st.st_mode):
                files.append(name)
            else:
                odd[name] = "special_file"

    visit(root, "")
    return sorted(files), odd


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _read_text(path: Path) -> Text:
    try:
        return decode_text(path.read_bytes())
    except OSError:  # a broken link, no permission
        return Text(None, UNREADABLE)


def _records(path: Path) -> Iterator[dict]:
    text = _read_text(path).text
    if text is None:
        raise BadInput(f"{path}: cannot read as text (not UTF-8, UTF-16 or latin-1)")
    if path.suffix == ".csv":
        yield from csv.DictReader(io.StringIO(text, newline=""))
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}:{n}: not JSON: {e.msg}") from None


def _metadata(root: Path, spec: SourceSpec, files: list[str]) -> dict[str, dict[str, str]]:
    """Relative image path -> {"caption": ..., "conditioning_image": absolute path} from all metadata files."""
    caption_fields = [k for k, v in spec.columns.items() if v == "caption"] + list(CAPTION_FIELDS)
    cond_fields = [k for k, v in spec.columns.items() if v == "conditioning_image"] + list(CONDITIONING_FIELDS)
    out: dict[str, dict[str, str]] = {}
    for meta in sorted(root / f for f in files if Path(f).name in METADATA_FILES):
        base = meta.parent
        for rec in _records(meta):
            if "file_name" not in rec:
                raise BadInput(f"{meta}: a record without 'file_name'")
            entry = {}
            caption = next((rec[k] for k in caption_fields if rec.get(k) is not None), None)
            if caption is not None:
                entry["caption"] = str(caption)
            cond = next((rec[k] for k in cond_fields if rec.get(k)), None)
            if cond is not None:
                entry["conditioning_image"] = str(base / cond)
            rel = (base / rec["file_name"]).relative_to(root).as_posix()
            out[rel] = entry
    return out


def _conditioning_folder(spec: SourceSpec, root: Path) -> Path | None:
    value = spec.columns.get("conditioning_folder")
    if not value:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir() and not folder.is_absolute() and (root / folder).is_dir():
        folder = root / folder  # relative to the image folder rather than the working directory
    if not folder.is_dir():
        raise MissingInput(f"{value}: conditioning folder not found")
    return folder


def _find_conditioning(folder: Path, rel: Path) -> Path | None:
    """The same relative name, or the same stem with another image extension."""
    same = folder / rel
    if same.is_file():
        return same
    for ext in IMAGE_EXTENSIONS:
        for cand in (same.with_suffix(ext), same.with_suffix(ext.upper())):
            if cand.is_file():
                return cand
    return None


def read(spec: SourceSpec) -> Iterator[SourceRow]:
    """Image paths under ``spec.location`` in sorted order, with captions and conditioning paths."""
    root = Path(spec.location).expanduser()
    if not root.is_dir():
        raise MissingInput(f"{root}: no image folder here")
    cond_folder = _conditioning_folder(spec, root)
    skip = Path(os.path.realpath(cond_folder)) if cond_folder is not None else None
    files, odd = walk(root)
    metadata = _metadata(root, spec, files)
    cond_files = {os.path.realpath(m["conditioning_image"]) for m in metadata.values() if "conditioning_image" in m}
    uses_conditioning = cond_folder is not None or bool(cond_files)

    def is_target(rel: str) -> bool:  # an image, and not a conditioning image kept inside the folder
        if not _is_image(Path(rel)):
            return False
        resolved = Path(os.path.realpath(root / rel))
        return str(resolved) not in cond_files and not (skip is not None and skip in resolved.parents)

    rels = sorted([r for r in files if is_target(r)] + list(odd))
    for rel in rels:
        if rel in odd:
            yield SourceRow(id=rel, image=b"", skip=odd[rel])
            continue
        path = root / rel
        meta = metadata.get(rel, {})
        side = path.with_suffix(".txt")
        row = SourceRow(id=rel, image=str(path), caption=meta.get("caption"))
        if side.is_file() or side.is_symlink():
            text = _read_text(side)
            row.caption, row.caption_encoding = (text.text or "").strip(), text.encoding
        if uses_conditioning:
            cond = meta.get("conditioning_image")
            cond_path = Path(cond) if cond else _find_conditioning(cond_folder, Path(rel)) if cond_folder else None
            if cond_path is not None and cond_path.is_file():
                row.conditioning_image = str(cond_path)
            else:
                row.problem = "missing_conditioning"
        yield row
