"""The latent cache's format: where it lives, what its fingerprint covers, and how training
reads it. The cache stage (stages/cache.py) writes it; the train stage reads it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Array2D, Array3D, Dataset, Features, Sequence, Value
from safetensors.torch import load_file, save_file

from ..core.config import Config
from ..core.errors import BadInput, MissingInput
from ..core.storage import CACHE_DIR, CAPTIONS_DIR, load_dataset_dir, read_json
from ..models.base_model import BaseRef
from ..models.families import POOLED, TEXT, family

META = "cache.json"
SPLIT = "train"  # the cache is a sharded dataset (storage.ShardedOutput) with this one split
EMPTY = "empty_prompt.safetensors"


def _hash_folder(h, folder: Path) -> None:
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)


def fingerprint(dataset_fingerprint: str, num_rows: int, ref: BaseRef, resolution: int) -> str:
    """What the cache depends on: the dataset, the VAE/text encoders/tokenizers, the resolution
    (and for families other than SD 1.x/2.x, the family; for a VAE override, that VAE)."""
    h = hashlib.sha256(f"{dataset_fingerprint}|{num_rows}|{resolution}|{ref.revision}".encode())
    if ref.family != "sd" or ref.vae:
        h.update(f"|{ref.family}|{ref.vae}".encode())
    if ref.max_sequence_length:
        h.update(f"|{ref.max_sequence_length}".encode())
    local = Path(ref.name_or_path)
    if local.is_dir():
        for sub in family(ref.family).cache_parts:
            if sub == "vae" and ref.vae:
                continue
            _hash_folder(h, local / sub)
    else:
        h.update(ref.name_or_path.encode())
    if ref.vae and Path(ref.vae).is_dir():
        _hash_folder(h, Path(ref.vae))
    return h.hexdigest()[:16]


def current_fingerprint(cfg: Config) -> str:
    train = load_dataset_dir(CAPTIONS_DIR)["train"]
    return fingerprint(train._fingerprint, len(train), BaseRef.read(), cfg.recipe.data.resolution)


@dataclass
class LatentCache:
    """The cached training split: per-sample latent posterior (mean, std) and text features
    (the family's: SDXL adds a pooled embedding and time ids; SD3 and Flux a pooled embedding and
    the condition's latent posterior)."""

    # columns latent_mean, latent_std, text_embedding[, pooled_embedding, time_ids, control_mean, control_std];
    # with aspect buckets, one Dataset per bucket (by name, WxH)
    rows: Dataset | dict[str, Dataset]
    empty_prompt: dict[str, torch.Tensor]  # the empty caption's text features (1, ...), for caption dropout
    scaling_factor: float
    fingerprint: str
    shift_factor: float = 0.0
    buckets: dict[str, list[int]] | None = None  # with aspect buckets: each bucket's rows of the captions' train split

    @classmethod
    def load(cls, expected_fingerprint: str | None = None, root: Path = CACHE_DIR) -> LatentCache:
        meta_file = root / META
        if not meta_file.is_file():
            raise MissingInput(f"{meta_file}: no latent cache; run the cache stage first (dvc repro cache)")
        meta = read_json(meta_file)
        if expected_fingerprint and meta["fingerprint"] != expected_fingerprint:
            raise BadInput(
                f"{meta_file}: made for another dataset or base model (fingerprint {meta['fingerprint']}, "
                f"expected {expected_fingerprint}); run the cache stage again (dvc repro cache)"
            )
        folder = root / meta["fingerprint"]
        splits = load_dataset_dir(folder)
        buckets = meta.get("buckets")
        rows = {b: splits[b].with_format("torch") for b in buckets} if buckets else splits[SPLIT].with_format("torch")
        empty = read_empty(folder / EMPTY)
        return cls(rows, empty, meta["scaling_factor"], meta["fingerprint"], meta.get("shift_factor", 0.0), buckets)


def features(columns: dict[str, torch.Tensor]) -> Features:
    """The cache's column types, from a shard's tensors (N, ...): latents (Array3D), token
    embeddings (Array2D), and per-sample vectors such as SDXL's pooled embedding and time ids."""
    kinds = {3: Array3D, 2: Array2D}
    out = {}
    for k, v in columns.items():
        dtype = str(v.dtype).removeprefix("torch.")
        out[k] = kinds[v.ndim - 1](tuple(v.shape[1:]), dtype) if v.ndim > 2 else Sequence(Value(dtype), length=v.shape[1])
    return Features(out)


def _empty_key(feature: str) -> str:
    return "empty" if feature == TEXT else f"empty_{feature}"  # "empty": the key SD caches have always had


def write_empty(path: Path, empty: dict[str, torch.Tensor]) -> None:
    save_file({_empty_key(k): v.contiguous() for k, v in empty.items()}, path)


def read_empty(path: Path) -> dict[str, torch.Tensor]:
    keys = {_empty_key(k): k for k in (TEXT, POOLED)}
    return {keys[k]: v for k, v in load_file(path).items()}
