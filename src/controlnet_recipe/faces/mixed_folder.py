"""A folder of synthetic faces at mixed aspects, each with its face-part map as a given condition:
real-world-shaped data that the tests and the buckets benchmark build without a download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .draw import draw_segmentation
from .synthetic import make_face

# (width, height) of the folder's photos at 64 px: portrait 3:4, landscape 16:9, square, panorama 3:1
ASPECTS = {"portrait": (60, 80), "landscape": (96, 54), "square": (64, 64), "panorama": (150, 50)}
SKIPPED = {"strip": (200, 10), "small": (30, 30)}  # 20:1, and fewer pixels than any bucket at 64 px


def write_mixed_folder(
    root: Path, per_aspect: int = 10, scale: float = 1.0, half_size_conditions: bool = False, copies: bool = False
) -> Path:
    """``root/images``: faces on canvases of :data:`ASPECTS` (sides times ``scale``), placed left,
    centre or right, and their maps in ``images/conditions`` (the photo's size, or half of it;
    ``copies``: the photo itself), plus one 20:1 strip and one too-small image. Returns the folder."""
    images, conds = root / "images", root / "images" / "conditions"
    conds.mkdir(parents=True)
    k = 0
    for kind, size in {**ASPECTS, **SKIPPED}.items():
        w, h = (round(size[0] * scale), round(size[1] * scale)) if kind in ASPECTS else size
        for j in range(per_aspect if kind in ASPECTS else 1):
            side = min(w, h)
            face, lm, _ = make_face(k, side)
            canvas = Image.new("RGB", (w, h), tuple(int(x) for x in np.asarray(face)[0, 0]))
            left, top = (w - side) // 2 + (j % 3 - 1) * (w - side) // 4, (h - side) // 2
            canvas.paste(face, (left, top))
            cond = canvas.copy() if copies else draw_segmentation([np.asarray(lm) + [left, top]], (w, h))
            if half_size_conditions:
                cond = cond.resize((w // 2, h // 2), Image.NEAREST)
            canvas.save(images / f"{kind}-{j:03d}.png")
            cond.save(conds / f"{kind}-{j:03d}.png")
            k += 1
    return images
