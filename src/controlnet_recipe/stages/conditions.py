"""conditions stage: add the conditioning image to each sample.

``face_segmentation`` draws the landmarks into a face-part map (each part filled with its own
colour on black), as the source recipe does. ``detector`` says where the landmarks come from;
``ground_truth`` uses the ones the data stage stored. Samples with no face are dropped and counted.
"""

from __future__ import annotations

import os

import numpy as np

from ..config import Config
from ..faces.draw import draw_segmentation
from ..storage import CONDITIONS_DIR, DATA_DIR, fresh_dir, load_dataset_dir, write_json


def face_segmentation(batch: dict, image_column: str, out_column: str) -> dict:
    """Batched ``datasets.map`` function: landmarks -> segmentation map of the image's size."""
    conds = []
    for img, faces in zip(batch[image_column], batch["landmarks"]):
        conds.append(draw_segmentation([np.asarray(f, dtype=np.float32) for f in faces], img.size))
    return {out_column: conds}


def main(cfg: Config) -> None:
    r = cfg.recipe
    ds = load_dataset_dir(DATA_DIR)
    report: dict = {"kind": r.conditions.kind, "detector": r.conditions.detector, "splits": {}}
    procs = max(1, min(os.cpu_count() or 1, 8))
    for split in list(ds):
        before = len(ds[split])
        kept = ds[split].filter(lambda faces: len(faces) > 0, input_columns=["landmarks"])
        kept = kept.map(
            face_segmentation,
            batched=True,
            batch_size=64,
            fn_kwargs={"image_column": r.columns.image, "out_column": r.columns.conditioning_image},
            num_proc=procs if len(kept) >= 256 else None,
            desc=f"conditions ({split})",
        )
        from datasets import Image

        ds[split] = kept.cast_column(r.columns.conditioning_image, Image())
        report["splits"][split] = {"in": before, "kept": len(kept), "dropped": {"no_face": before - len(kept)}}
    out = fresh_dir(CONDITIONS_DIR)
    ds.save_to_disk(str(out))
    write_json(out / "report.json", report)
    print(f"conditions: {report['splits']} -> {out}")
