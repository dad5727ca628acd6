"""Local parquet files (a single file, a folder, or a glob such as ``shards/*.parquet``), streamed with
datasets' parquet builder. Columns map as for :mod:`.hub`; image columns stay raw bytes."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

from ..core.errors import MissingInput
from . import SourceRow, SourceSpec
from .hub import rows_from_dataset


def parquet_files(location: str) -> list[str]:
    """The files ``location`` names, sorted (the row order, and so the ids, follow it)."""
    pattern = os.path.join(location, "**", "*.parquet") if os.path.isdir(location) else location
    files = sorted(os.path.abspath(f) for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
    if not files:
        raise MissingInput(f"{location}: no parquet files")
    return files


def read(spec: SourceSpec) -> Iterator[SourceRow]:
    """Stream the rows of every parquet file in ``spec.location``, in file order; ids ``{split}-{index:08d}``."""
    from datasets import load_dataset

    files = parquet_files(spec.location)
    ds = load_dataset("parquet", data_files={spec.split: files}, split=spec.split, streaming=True)
    yield from rows_from_dataset(ds, spec)
