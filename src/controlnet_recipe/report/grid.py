"""Image grids with row titles, for stage reports and evaluation."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

TITLE_WIDTH = 110
TITLE_HEIGHT = 22


def make_grid(
    rows: list[list[Image.Image]],
    row_titles: list[str] | None = None,
    col_titles: list[str] | None = None,
    cell: int = 128,
) -> Image.Image:
    """One row per list; each image scaled to fit ``cell`` pixels (nearest, so pixels stay honest)."""
    cols = max(len(r) for r in rows)
    left = TITLE_WIDTH if row_titles else 0
    top = TITLE_HEIGHT if col_titles else 0
    grid = Image.new("RGB", (left + cols * cell, top + len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(col_titles or []):
        draw.text((left + j * cell + 6, 6), title, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        if row_titles:
            draw.text((6, top + i * cell + cell // 2 - 6), row_titles[i], fill=(0, 0, 0))
        for j, img in enumerate(row):
            img, (dx, dy) = fit_cell(img.convert("RGB"), cell)
            grid.paste(img, (left + j * cell + dx, top + i * cell + dy))
    return grid


def fit_cell(img: Image.Image, cell: int) -> tuple[Image.Image, tuple[int, int]]:
    """``img`` scaled to fit a ``cell`` square with its aspect kept (a bucket's shape shows), and
    its offset in the cell."""
    w, h = img.size
    s = cell / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return img.resize(size, Image.NEAREST), ((cell - size[0]) // 2, (cell - size[1]) // 2)


def save_grid(rows: list[list[Image.Image]], path: Path, **kw) -> Path:
    """:func:`make_grid`, saved as a PNG at ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, **kw).save(path)
    return Path(path)


def save_bucket_samples(ds, columns: list[str], path: Path, cell: int = 128) -> Path:
    """One row per aspect bucket (a dataset's ``bucket`` column): its first sample's images in
    ``columns`` (those it has), titled with the bucket and its count."""
    from collections import Counter

    buckets = list(ds["bucket"])
    counts = Counter(buckets)
    first = {b: buckets.index(b) for b in sorted(counts)}
    have = [c for c in columns if c in ds.column_names]
    rows = [[ds[i][c] for c in have if ds[i][c] is not None] for i in first.values()]
    titles = [f"{b} ({counts[b]})" for b in first]
    return save_grid(rows, path, row_titles=titles, col_titles=have, cell=cell)
