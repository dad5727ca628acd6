"""Hugging Face datasets, streamed: a hub id (``multimodalart/facesyntheticsspigacaptioned``) or a local
folder in the hub's layout (``data/train-00000-of-00001.parquet``), through the same code path.

``spec.columns`` maps source columns to recipe columns, e.g. ``{"image": "image", "spiga_seg":
"conditioning_image", "image_caption": "caption"}``. Image columns are cast to ``Image(decode=False)``
so that rows stay raw bytes; the stage decodes them.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import Any

from ..core.errors import BadInput
from . import RECIPE_COLUMNS, SourceRow, SourceSpec

DEFAULT_COLUMNS = {"image": "image", "conditioning_image": "conditioning_image", "caption": "caption", "text": "caption"}
NOT_COLUMNS = ("conditioning_folder",)  # keys of spec.columns that configure a source rather than name a column


def column_map(spec: SourceSpec, available: Iterable[str] | None) -> dict[str, str]:
    """Source column -> recipe column; the default maps same-named columns (and ``text`` to caption)."""
    mapping = {k: v for k, v in spec.columns.items() if k not in NOT_COLUMNS}
    bad = {k: v for k, v in mapping.items() if v not in RECIPE_COLUMNS}
    if bad:
        raise BadInput(f"columns {bad}: recipe columns are {', '.join(RECIPE_COLUMNS)}")
    if not mapping:
        cols = set(available or ())
        mapping = {k: v for k, v in DEFAULT_COLUMNS.items() if k in cols}
        mapping = {k: v for k, v in mapping.items() if not (k == "text" and "caption" in mapping)}
    elif available is not None:
        missing = sorted(set(mapping) - set(available))
        if missing:
            raise BadInput(f"{spec.location}: no column {', '.join(missing)}; it has {', '.join(sorted(available))}")
    if "image" not in mapping.values():
        raise BadInput(f"{spec.location}: no column maps to 'image' (columns: {mapping or 'none'})")
    return mapping


def raw_image(value: Any) -> bytes | str | None:
    """An image cell as raw bytes or a path: ``{"bytes", "path"}`` dicts, bytes, paths, or PIL images (re-encoded)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return bytes(value["bytes"]) if value.get("bytes") else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value
    if hasattr(value, "save"):  # a decoded PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"not an image cell: {type(value).__name__}")


def _caption(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):  # several captions per image: take the first
        value = next((v for v in value if v), None)
    return None if value is None else str(value)


def rows_from_dataset(ds, spec: SourceSpec) -> Iterator[SourceRow]:
    """Rows of a (streaming) ``datasets`` dataset, ids ``{split}-{index:08d}``, with image columns kept raw."""
    from datasets import Image

    features = ds.features
    mapping = column_map(spec, features.keys() if features is not None else None)
    if features is not None:
        ds = ds.select_columns(list(mapping))
        for col in mapping:
            if isinstance(features[col], Image) and features[col].decode:
                ds = ds.cast_column(col, Image(decode=False))
    by_recipe = {v: k for k, v in mapping.items()}
    for i, ex in enumerate(ds):
        image = raw_image(ex.get(by_recipe["image"]))
        row = SourceRow(id=f"{spec.split}-{i:08d}", image=b"" if image is None else image)
        if "caption" in by_recipe:
            row.caption = _caption(ex.get(by_recipe["caption"]))
        if "conditioning_image" in by_recipe:
            row.conditioning_image = raw_image(ex.get(by_recipe["conditioning_image"]))
            if row.conditioning_image is None:
                row.problem = "missing_conditioning"
        yield row


def read(spec: SourceSpec) -> Iterator[SourceRow]:
    """Stream ``load_dataset(spec.location, revision=spec.revision, split=spec.split)`` as raw rows."""
    from datasets import load_dataset

    ds = load_dataset(spec.location, revision=spec.revision, split=spec.split, streaming=True)
    yield from rows_from_dataset(ds, spec)
