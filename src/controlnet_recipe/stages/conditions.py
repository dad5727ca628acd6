"""conditions stage: add the conditioning image to each sample.

The recipe's condition kind (``conditions.kind``, one module each in ``conditions/``) makes it:
face-part maps from landmarks, Canny edges, the source's own images, or a model's depth or
segmentation. Kinds made by a model run batched on the GPU, one process per GPU taking every
n-th shard; the others run on every core. Samples that cannot have a condition (no face found,
bad landmarks, no conditioning image) are dropped and counted by reason; the report has the counts
and a grid of images beside their conditions.
"""

from __future__ import annotations

from collections import Counter

from PIL import Image

from ..conditions import Condition, condition
from ..core.config import Config
from ..core.images import encode_png
from ..core.storage import (
    CONDITIONS_DIR,
    PHOTOREAL_DIR,
    ShardedOutput,
    dataset_key,
    digest,
    each_gpu,
    load_dataset_dir,
    num_workers,
    write_json,
    write_shard,
)
from ..report.grid import save_bucket_samples, save_grid


def condition_batch(batch: dict, cond: Condition, image_column: str, out_column: str) -> dict:
    """Batched ``datasets.map`` function: a condition per sample, or a drop reason."""
    rows = [
        {"landmarks": lms, "problem": problem, "source_condition": given}
        for lms, problem, given in zip(batch["landmarks"], batch["problem"], batch[out_column])
    ]
    made = cond.make_batch(batch[image_column], rows)
    # Encoded here, in the worker, with fast PNG compression (the maps are flat colours).
    conds = [
        {"bytes": encode_png(m.condition), "path": None} if isinstance(m.condition, Image.Image) else m.condition for m in made
    ]
    landmarks = [m.landmarks if m.landmarks is not None else row["landmarks"] for m, row in zip(made, rows)]
    return {out_column: conds, "drop_reason": [m.reason for m in made], "landmarks": landmarks}


def condition_shard(part, cond: Condition, cfg: Config, num_proc: int | None, desc: str):
    """The shard with its conditions, the samples without one dropped; and the drop counts."""
    cols = cfg.recipe.columns
    part = part.map(
        condition_batch,
        batched=True,
        batch_size=cfg.recipe.conditions.batch_size if cond.uses_model else 32,
        fn_kwargs={"cond": cond, "image_column": cols.image, "out_column": cols.conditioning_image},
        num_proc=num_proc,
        desc=desc,
    )
    dropped = Counter(x for x in part["drop_reason"] if x)
    return part.filter(lambda reason: reason is None, input_columns=["drop_reason"]).remove_columns("drop_reason"), dropped


def _worker(rank: int, world: int, todo: list[tuple[str, int, int, int]], cfg: Config) -> None:
    """One process: the shards ``todo[rank::world]`` (on GPU ``rank`` when the kind runs a model)."""
    import torch

    cond = condition(cfg.recipe.conditions)
    if cond.uses_model and torch.cuda.is_available():
        cond.device = f"cuda:{rank}"
    procs = None if cond.uses_model else num_workers(cfg.recipe.conditions.num_proc)
    ds = load_dataset_dir(PHOTOREAL_DIR)  # the source images, or their img2img versions when photoreal is enabled
    for split, i, lo, hi in todo[rank::world]:
        part = ds[split].select(range(lo, hi))
        n = procs if procs and len(part) >= 64 * procs else None
        part, dropped = condition_shard(part, cond, cfg, n, f"conditions ({split}, shard {i})")
        # written even when every sample was dropped: its counts still count when the stage resumes
        write_shard(CONDITIONS_DIR, split, i, part, {"dropped": dict(dropped)})


def build_conditions(cfg: Config) -> dict:
    r, c = cfg.recipe, cfg.recipe.conditions
    cond = condition(c)
    ds = load_dataset_dir(PHOTOREAL_DIR)
    out = ShardedOutput(
        CONDITIONS_DIR, digest(c.model_dump(), r.columns.model_dump(), dataset_key(PHOTOREAL_DIR)), stage="conditions"
    )
    shard = r.data.shard_size
    plan = [(s, i, lo, min(lo + shard, len(d))) for s, d in ds.items() for i, lo in enumerate(range(0, max(len(d), 1), shard))]
    todo = [p for p in plan if not out.done(p[0], p[1]) and p[3] > p[2]]  # finished by an interrupted run: kept
    each_gpu(_worker, todo, cfg, gpus=cond.uses_model, what="conditions")
    report = {**cond.report(), "splits": {}}
    for split, data in ds.items():
        dropped: Counter = Counter()
        out.shards.setdefault(split, set())
        for i, lo in enumerate(range(0, max(len(data), 1), shard)):
            if not out.done(split, i) and len(data) > lo:
                raise RuntimeError(f"conditions: shard {i} of {split} was not written; rerun to resume")
            dropped.update(out.stats(split, i).get("dropped", {}))
        report["splits"][split] = {"in": len(data), "dropped": dict(dropped)}
    out.finish()
    done = load_dataset_dir(CONDITIONS_DIR)
    for split, data in done.items():
        report["splits"][split]["kept"] = len(data)
    if "train" in done and "bucket" in done["train"].column_names:  # one pair per aspect bucket
        train = done["train"]
        report["buckets"] = {s: dict(sorted(Counter(d["bucket"]).items())) for s, d in done.items()}
        save_bucket_samples(train, [r.columns.image, r.columns.conditioning_image], CONDITIONS_DIR / "samples.png")
    elif "train" in done and len(done["train"]):  # the preview from the finished dataset: resumed or not
        rows = done["train"].select(range(min(8, len(done["train"]))))
        samples = [list(s) for s in zip(rows[r.columns.image], rows[r.columns.conditioning_image])]
        save_grid(samples, CONDITIONS_DIR / "samples.png", col_titles=["image", "condition"], cell=128)
    return report


def main(cfg: Config) -> None:
    report = build_conditions(cfg)
    write_json(CONDITIONS_DIR / "report.json", report)
    print(f"conditions: {report['splits']} -> {CONDITIONS_DIR}")
