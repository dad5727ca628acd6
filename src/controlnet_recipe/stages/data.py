"""data stage: the source images (with landmarks, captions or conditioning images where the source
has them), split into train and validation, written in shards.

Sources are chosen by ``data.source``: ``synthetic`` renders faces from seeds (the embedded
default); ``facesynthetics``, ``hub``, ``imagefolder`` and ``parquet`` read real data. Rows stream
through worker processes that decode (or render) them, so memory stays flat whatever the size of
the dataset; a bad file is skipped and counted by reason, never fatal. A held-out sample is chosen
by a seeded hash of its id, so the split does not depend on the order or the number of rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing as mp
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, Features, Image, Sequence, Value
from PIL import Image as PILImage

from ..core.buckets import Bucket, cover, fit_to_bucket, move_points, nearest, skip_reason
from ..core.buckets import name as bucket_name
from ..core.config import Config, DataCfg
from ..core.images import decode_image, encode_png
from ..core.logs import progress
from ..core.storage import DATA_DIR, ShardedOutput, digest, num_workers, write_json
from ..core.text import UNDECODABLE, UNREADABLE
from ..faces.synthetic import make_face
from ..models.families import recipe_buckets
from ..report.grid import save_bucket_samples, save_grid

SPLIT_SEED_STRIDE = 10_000_000  # synthetic validation seeds never collide with training seeds
VALIDATION_RATE = 0.1  # share of rows offered to validation (by hash) until it is full


@dataclass(frozen=True)
class SyntheticSeed:
    seed: int
    size: int


def features(image: str, conditioning_image: str, caption: str, bucketed: bool = False) -> Features:
    bucket = {"bucket": Value("string")} if bucketed else {}  # WxH: the aspect bucket the pair was cropped to
    return Features(
        {
            **bucket,
            "id": Value("string"),
            image: Image(),
            conditioning_image: Image(),
            caption: Value("string"),
            "landmarks": Sequence(Sequence(Sequence(Value("float32")))),  # faces x 68 x (x, y)
            "attributes": Value("string"),  # JSON of what a generator chose ("" for real data)
            "problem": Value("string"),  # e.g. bad_landmarks: kept, but not usable as ground truth
        }
    )


def _png(img) -> dict:
    """An ``Image`` feature value, encoded here (in the worker) with fast PNG compression."""
    return {"bytes": encode_png(img), "path": None}


@dataclass(frozen=True)
class Bucketing:
    """``data.buckets`` on: the buckets, and the aspect beyond which an image is skipped."""

    buckets: list[Bucket]
    max_aspect: float
    condition_resample: int = PILImage.NEAREST  # a map's classes stay pure; bicubic for maps stated continuous


def to_bucket(img, cond, landmarks: list, b: Bucketing) -> tuple[tuple | None, str | None]:
    """((image, condition, landmarks, bucket name), None) with all three cropped alike to the
    image's nearest bucket, or (None, why it is skipped)."""
    reason = skip_reason(*img.size, b.buckets, b.max_aspect)
    if reason is not None:
        return None, reason
    crop = cover(*img.size, nearest(*img.size, b.buckets))
    cond = fit_to_bucket(cond, crop, source_size=img.size, resample=b.condition_resample) if cond is not None else None
    landmarks = [move_points(lm, img.size, crop).tolist() for lm in landmarks]
    return (fit_to_bucket(img, crop), cond, landmarks, bucket_name(crop.bucket)), None


def materialize(
    item, min_size: int, undecodable_captions: str = "empty", bucketing: Bucketing | None = None
) -> tuple[dict | None, str | None, str | None]:
    """(row, skip reason, converted-from mode) for a synthetic seed or a raw source row; with
    ``bucketing``, cropped to its bucket. Runs in worker processes; never raises for bad data."""
    if isinstance(item, SyntheticSeed):
        img, lm, attrs = make_face(item.seed, item.size)
        row = {"id": f"synthetic-{item.seed}", "image": img, "conditioning_image": None, "caption": None}
        row = {**row, "landmarks": [lm.tolist()], "attributes": json.dumps(attrs.to_dict()), "problem": None}
        return (*finish_row(row, bucketing), None)
    if item.skip is not None:  # the source met something that is no sample (a symlink loop, a FIFO, ...)
        return None, item.skip, None
    if item.caption_encoding in (UNDECODABLE, UNREADABLE) and undecodable_captions == "skip":
        return None, f"{item.caption_encoding}_caption", None
    decoded = decode_image(item.image, min_size=min_size)
    if decoded.image is None:
        return None, decoded.reason, None
    cond = None
    problem = item.problem
    if item.conditioning_image is not None:
        c = decode_image(item.conditioning_image, min_size=min_size)
        cond = c.image
        problem = problem or (None if c.image is not None else f"conditioning_{c.reason}")
    landmarks = [np.asarray(item.landmarks, dtype=np.float32).tolist()] if item.landmarks is not None else []
    row = {"id": item.id, "image": decoded.image, "conditioning_image": cond, "caption": item.caption}
    row, reason = finish_row({**row, "landmarks": landmarks, "attributes": "", "problem": problem}, bucketing)
    return row, reason, decoded.converted if row is not None else None


def finish_row(row: dict, bucketing: Bucketing | None) -> tuple[dict | None, str | None]:
    """The row with its images cropped to its bucket (with ``bucketing``) and PNG-encoded, or why it is skipped."""
    if bucketing is not None:
        fitted, reason = to_bucket(row["image"], row["conditioning_image"], row["landmarks"], bucketing)
        if fitted is None:
            return None, reason
        img, cond, landmarks, bucket = fitted
        row = {**row, "image": img, "conditioning_image": cond, "landmarks": landmarks, "bucket": bucket}
    cond = row["conditioning_image"]
    return {**row, "image": _png(row["image"]), "conditioning_image": _png(cond) if cond is not None else None}, None


def in_validation(sample_id: str, seed: int) -> bool:
    h = int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:8], 16)
    return h / 2**32 < VALIDATION_RATE


def routed_rows(d: DataCfg, cache_dir) -> Iterator[tuple[str, object]]:
    """(split, raw item) in a deterministic order; stops once both splits are full."""
    if d.source == "synthetic":
        for j in range(d.num_train):
            yield "train", SyntheticSeed(d.seed * 1000 + j, d.resolution)
        for j in range(d.num_validation):
            yield "validation", SyntheticSeed(d.seed * 1000 + SPLIT_SEED_STRIDE + j, d.resolution)
        return
    from ..sources import SOURCES, SourceSpec

    columns = dict(d.source_columns)
    if d.conditioning_folder:
        columns["conditioning_folder"] = d.conditioning_folder
    spec = SourceSpec(location=d.location, revision=d.revision, sha256=d.sha256, columns=columns, cache_dir=cache_dir)
    counts = Counter()
    for row in SOURCES[d.source](spec):
        split = "validation" if counts["validation"] < d.num_validation and in_validation(row.id, d.seed) else "train"
        if split == "train" and d.num_train and counts["train"] >= d.num_train:
            if counts["validation"] >= d.num_validation:
                return
            continue
        counts[split] += 1
        yield split, row


def build_data(cfg: Config, cache_dir) -> dict:
    r, d = cfg.recipe, cfg.recipe.data
    cols = r.columns
    buckets = recipe_buckets(r)
    resample = PILImage.BICUBIC if r.conditions.map_type == "continuous" else PILImage.NEAREST
    bucketing = Bucketing(buckets, d.max_aspect, resample) if buckets else None
    feats = features(cols.image, cols.conditioning_image, cols.caption, bucketed=bucketing is not None)
    out = ShardedOutput(DATA_DIR, digest(d.model_dump(), cols.model_dump()), stage="data")
    report = {"source": d.source, "splits": {}, "skipped": Counter(), "converted": Counter(), "caption_encodings": Counter()}
    buffers: dict[str, list] = {"train": [], "validation": []}
    index = Counter()
    counted = ("skipped", "converted", "caption_encodings")
    ctx = mp.get_context("fork")
    with ctx.Pool(num_workers()) as pool:

        def flush(split: str) -> None:
            items, buffers[split] = buffers[split], []
            i = index[split]
            index[split] += 1
            if not items:
                return
            if out.done(split, i):  # finished by an earlier, interrupted run: its counts still count
                for k, v in out.stats(split, i).items():
                    report[k].update(v)
                return
            rows = []
            stats = {k: Counter() for k in counted}
            work = functools.partial(
                materialize, min_size=d.min_size, undecodable_captions=d.undecodable_captions, bucketing=bucketing
            )
            for item, (row, reason, converted) in zip(items, pool.imap(work, items, chunksize=8)):
                if row is None:
                    stats["skipped"][reason] += 1
                    continue
                if converted:
                    stats["converted"][converted] += 1
                if getattr(item, "caption_encoding", None):  # kept: decoded from another encoding, or emptied
                    stats["caption_encodings"][item.caption_encoding] += 1
                rows.append(
                    {k if k not in ("image", "conditioning_image", "caption") else getattr(cols, k): v for k, v in row.items()}
                )
            ds = Dataset.from_list(rows, features=feats) if rows else Dataset.from_dict({k: [] for k in feats}, features=feats)
            out.write(split, i, ds, stats={k: dict(v) for k, v in stats.items()})
            for k, v in stats.items():
                report[k].update(v)

        bar = progress(desc=f"data: {d.source}", unit=" samples")
        for split, item in routed_rows(d, cache_dir):
            buffers[split].append(item)
            bar.update()
            if len(buffers[split]) >= d.shard_size:
                flush(split)
        for split in ("train", "validation"):
            flush(split)
        bar.close()
    out.finish()
    from ..core.storage import load_dataset_dir

    ds = load_dataset_dir(DATA_DIR)
    report["splits"] = {s: len(v) for s, v in ds.items()}
    # the preview from the finished dataset: the same whether or not the run was interrupted
    if bucketing is not None:
        report["buckets"] = {s: dict(sorted(Counter(v["bucket"]).items())) for s, v in ds.items()}
        if "train" in ds and len(ds["train"]):
            save_bucket_samples(ds["train"], [cols.image, cols.conditioning_image], DATA_DIR / "samples.png")
    elif "train" in ds and len(ds["train"]):
        save_grid([ds["train"].select(range(min(8, len(ds["train"]))))[cols.image]], DATA_DIR / "samples.png", cell=96)
    for k in ("skipped", "converted", "caption_encodings"):
        report[k] = dict(report[k])
    return report


def main(cfg: Config) -> None:
    report = build_data(cfg, cache_dir=DATA_DIR.parent / "downloads")
    write_json(DATA_DIR / "report.json", report)
    skipped, converted = report["skipped"] or "none", report["converted"] or "none"
    captions = report["caption_encodings"] or "all UTF-8"
    buckets = f", buckets {report['buckets']}" if "buckets" in report else ""
    print(f"data: {report['splits']}{buckets}, skipped {skipped}, converted {converted}, captions {captions} -> {DATA_DIR}")
