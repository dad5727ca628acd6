"""conditions stage: add the conditioning image to each sample.

``face_segmentation`` draws 68 landmarks into a face-part map (each part filled with its own colour
on black), as the source recipe does; the landmarks are the source's ground truth or detected
(dlib, SPIGA) with the same drawing code. ``canny`` draws OpenCV edges, for conditions that need no
face. ``given`` keeps the source's own conditioning images. Samples that cannot have a condition
(no face found, bad landmarks, no conditioning image) are dropped and counted by reason; the report
has the counts and a grid of images beside their conditions.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image

from ..config import ConditionsCfg, Config
from ..faces.draw import draw_segmentation
from ..images import encode_png
from ..report.grid import save_grid
from ..storage import CONDITIONS_DIR, PHOTOREAL_DIR, ShardedOutput, dataset_key, digest, load_dataset_dir, num_workers, write_json

_detector = None  # one per worker process, loaded on first use


def _landmarks(img, row_landmarks, problem, c: ConditionsCfg) -> tuple[list[np.ndarray], str | None]:
    global _detector
    if c.detector == "ground_truth":
        if problem == "bad_landmarks" or not row_landmarks:
            return [], "bad_landmarks"
        return [np.asarray(f, dtype=np.float32) for f in row_landmarks], None
    if _detector is None:
        from ..faces.landmarks import get_detector

        _detector = get_detector(c.detector)
    faces = _detector.detect(np.asarray(img.convert("RGB")))
    return faces, None if faces else "no_face"


def condition_batch(batch: dict, c: ConditionsCfg, image_column: str, out_column: str) -> dict:
    """Batched ``datasets.map`` function: a condition per sample, or a drop reason."""
    conds, reasons, landmarks = [], [], []
    for img, lms, problem, given in zip(batch[image_column], batch["landmarks"], batch["problem"], batch[out_column]):
        cond, reason, found = None, None, lms
        if c.kind == "face_segmentation":
            faces, reason = _landmarks(img, lms, problem, c)
            found = [f.tolist() for f in faces]
            cond = draw_segmentation(faces, img.size) if faces else None
        elif c.kind == "canny":
            from ..conditions.canny import canny

            cond = canny(img, c.canny_low, c.canny_high)
        else:
            cond, reason = (given, None) if given is not None else (None, problem or "no_conditioning_image")
        # Encoded here, in the worker, with fast PNG compression (the maps are flat colours).
        conds.append({"bytes": encode_png(cond), "path": None} if isinstance(cond, Image.Image) else cond)
        reasons.append(reason)
        landmarks.append(found)
    return {out_column: conds, "drop_reason": reasons, "landmarks": landmarks}


def build_conditions(cfg: Config) -> dict:
    r, c = cfg.recipe, cfg.recipe.conditions
    src_dir = PHOTOREAL_DIR  # the source images, or their img2img versions when photoreal is enabled
    ds = load_dataset_dir(src_dir)
    out = ShardedOutput(CONDITIONS_DIR, digest(c.model_dump(), r.columns.model_dump(), dataset_key(src_dir)), stage="conditions")
    report = {"kind": c.kind, "detector": c.detector if c.kind == "face_segmentation" else None, "splits": {}}
    procs = num_workers(c.num_proc)
    shard = r.data.shard_size
    for split, data in ds.items():
        dropped: Counter = Counter()
        for i, lo in enumerate(range(0, max(len(data), 1), shard)):
            if out.done(split, i):  # finished by an earlier, interrupted run: its counts still count
                dropped.update(out.stats(split, i).get("dropped", {}))
                continue
            part = data.select(range(lo, min(lo + shard, len(data))))
            part = part.map(
                condition_batch,
                batched=True,
                batch_size=32,
                fn_kwargs={"c": c, "image_column": r.columns.image, "out_column": r.columns.conditioning_image},
                num_proc=procs if len(part) >= 64 * procs else None,
                desc=f"conditions ({split}, shard {i})",
            )
            shard_dropped = Counter(x for x in part["drop_reason"] if x)
            dropped.update(shard_dropped)
            part = part.filter(lambda reason: reason is None, input_columns=["drop_reason"]).remove_columns("drop_reason")
            out.write(split, i, part, stats={"dropped": dict(shard_dropped)})
        report["splits"][split] = {"in": len(data), "dropped": dict(dropped)}
    out.finish()
    done = load_dataset_dir(CONDITIONS_DIR)
    for split, data in done.items():
        report["splits"][split]["kept"] = len(data)
    if "train" in done and len(done["train"]):  # the preview from the finished dataset: resumed or not
        rows = done["train"].select(range(min(8, len(done["train"]))))
        samples = [list(s) for s in zip(rows[r.columns.image], rows[r.columns.conditioning_image])]
        save_grid(samples, CONDITIONS_DIR / "samples.png", col_titles=["image", "condition"], cell=128)
    return report


def main(cfg: Config) -> None:
    report = build_conditions(cfg)
    write_json(CONDITIONS_DIR / "report.json", report)
    print(f"conditions: {report['splits']} -> {CONDITIONS_DIR}")
