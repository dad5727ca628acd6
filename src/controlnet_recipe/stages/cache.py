"""cache stage: encode VAE latents and text embeddings once, so training never runs the VAE or the
text encoders (upstream runs both on every step) and keeps them out of GPU memory. For the
families whose ControlNet takes the condition as latents (SD3, Flux), the condition images'
posteriors too. Text features are stored in half precision: T5-XXL's are large (4,096 wide: 8 KiB
per token, so 4 MiB per caption at Flux's 512 tokens, 400 GiB at 100k images; the flux and sd3
recipes cache 128, ``base.max_sequence_length``).

The cache lives in ``data/cache/<fingerprint>/``, the fingerprint covering the dataset, the base
model and the resolution. It is a sharded dataset like every data stage's (``storage.ShardedOutput``):
an interrupted run keeps the shards it finished with the same code, and a changed dataset or model
gets a new folder.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from datasets import Dataset

from ..adapters import check as check_adapter
from ..core.buckets import parse as parse_bucket
from ..core.config import Config
from ..core.images import images_to_tensor
from ..core.logs import progress
from ..core.storage import CACHE_DIR, CAPTIONS_DIR, ShardedOutput, load_dataset_dir, write_json
from ..models.base_model import BaseRef, load_base
from ..models.families import CONTROL, family
from ..objectives.diffusion import encode_images
from ..training.latent_cache import EMPTY, META, SPLIT, features, fingerprint, write_empty


def bucket_groups(train, resolution: int) -> dict[str, tuple[tuple[int, int], list[int]]]:
    """The cache's splits: ``train`` (every row, square at ``resolution``), or with aspect buckets
    one per bucket (``WxH``: its size and the rows in it, in the dataset's order)."""
    if "bucket" not in train.column_names:
        return {SPLIT: ((resolution, resolution), list(range(len(train))))}
    rows: dict[str, list[int]] = {}
    for i, b in enumerate(train["bucket"]):
        rows.setdefault(b, []).append(i)
    return {b: (parse_bucket(b), rows[b]) for b in sorted(rows)}


def encode_shard(rows, size: tuple[int, int], base, fam, vae, cfg: Config) -> Dataset:
    """One shard's VAE posteriors and text features (and the family's extras), images at ``size``."""
    r, c = cfg.recipe, cfg.recipe.cache
    res = size[0] if size[0] == size[1] else size  # square: the resolution, as the cache has always been made
    cols: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(rows), c.batch_size):
        batch = rows[start : start + c.batch_size]
        pixels = images_to_tensor(batch[r.columns.image], res)
        mean, std = encode_images(vae, pixels, batch_size=c.batch_size, desc=None)
        text = fam.caption_features(base, list(batch[r.columns.caption]))[0]
        parts = {"latent_mean": mean.half(), "latent_std": std.half(), **{k: v.half() for k, v in text.items()}}
        if fam.control_latents:  # the condition as the pipeline encodes it: [-1, 1] pixels through the VAE
            cond = images_to_tensor(batch[r.columns.conditioning_image], res)
            cmean, cstd = encode_images(vae, cond, batch_size=c.batch_size, desc=None)
            parts.update({f"{CONTROL}_mean": cmean.half(), f"{CONTROL}_std": cstd.half()})
        parts.update(fam.image_features(batch[r.columns.image], res))  # SDXL: time ids
        for k, v in parts.items():
            cols.setdefault(k, []).append(v)
    data = {k: torch.cat(v) for k, v in cols.items()}
    return Dataset.from_dict({k: v.numpy() for k, v in data.items()}, features=features(data))


def build_cache(cfg: Config, root: Path = CACHE_DIR) -> dict:
    """Encode the training split shard by shard into ``root/<fingerprint>``; return the metadata."""
    r, c = cfg.recipe, cfg.recipe.cache
    train = load_dataset_dir(CAPTIONS_DIR)["train"]
    ref = BaseRef.read()
    fp = fingerprint(train._fingerprint, len(train), ref, r.data.resolution)
    root.mkdir(parents=True, exist_ok=True)
    for other in root.iterdir():  # one cache at a time: drop those of other datasets or models
        if other.is_dir() and other.name != fp:
            shutil.rmtree(other)
    folder = root / fp
    out = ShardedOutput(folder, key=fp, stage="cache")  # finished shards survive only the same code

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, fam = load_base(ref), family(ref.family)
    vae = base.vae.to(device).eval()
    for encoder in base.text_encoders:
        encoder.to(device).eval()
    write_empty(folder / EMPTY, fam.caption_features(base, [""])[1])

    groups = bucket_groups(train, r.data.resolution)
    todo = [(split, i, idx) for split, (size, idx) in groups.items() for i in range(math.ceil(len(idx) / c.shard_size))]
    n_shards = len(todo)
    todo = [t for t in todo if not out.done(t[0], t[1])]
    if len(todo) < n_shards:
        print(f"cache: resuming, {n_shards - len(todo)} of {n_shards} shards already done")
    for split, i, idx in progress(todo, desc="cache: shards"):
        rows = train.select(idx[i * c.shard_size : (i + 1) * c.shard_size])
        out.write(split, i, encode_shard(rows, groups[split][0], base, fam, vae, cfg))
    out.finish()
    meta = {
        "fingerprint": fp,
        "shards": n_shards,
        "num_rows": len(train),
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": float(vae.config.shift_factor or 0.0) if fam.shifts_latents else 0.0,
        "base": ref.__dict__,
        "resolution": r.data.resolution,
        **({"buckets": {k: idx for k, (_, idx) in groups.items()}} if SPLIT not in groups else {}),
    }
    write_json(root / META, meta)
    return meta


def main(cfg: Config) -> None:
    # the first stage that loads the base: a kind of control that does not run on its family (known
    # here for a hub model of family auto) stops before it does
    check_adapter(cfg.recipe.adapter, BaseRef.read().family, f"{cfg.recipe_name}.adapter")
    meta = build_cache(cfg)
    print(f"cache: {meta['num_rows']} samples in {meta['shards']} shards -> {CACHE_DIR / meta['fingerprint']}")
