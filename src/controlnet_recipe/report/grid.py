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
    """One row per list; each image scaled to ``cell`` pixels (nearest, so pixels stay honest)."""
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
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (left + j * cell, top + i * cell))
    return grid


def save_grid(rows: list[list[Image.Image]], path: Path, **kw) -> Path:
    """:func:`make_grid`, saved as a PNG at ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, **kw).save(path)
    return Path(path)
