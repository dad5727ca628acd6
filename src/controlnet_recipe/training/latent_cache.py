"""The latent cache's format: where it lives, what its fingerprint covers, and how training
reads it. The cache stage (stages/cache.py) writes it; the train stage reads it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Array2D, Array3D, Dataset, Features
from safetensors.torch import load_file

from ..config import Config
from ..errors import BadInput, MissingInput
from ..models.base_model import BaseRef
from ..storage import CACHE_DIR, CAPTIONS_DIR, load_dataset_dir, read_json

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
    """What the cache depends on: the dataset, the VAE/text encoder/tokenizer, the resolution."""
    h = hashlib.sha256(f"{dataset_fingerprint}|{num_rows}|{resolution}|{ref.revision}".encode())
    local = Path(ref.name_or_path)
    if local.is_dir():
        for sub in ("vae", "text_encoder", "tokenizer"):
            _hash_folder(h, local / sub)
    else:
        h.update(ref.name_or_path.encode())
    return h.hexdigest()[:16]


def current_fingerprint(cfg: Config) -> str:
    train = load_dataset_dir(CAPTIONS_DIR)["train"]
    return fingerprint(train._fingerprint, len(train), BaseRef.read(), cfg.recipe.data.resolution)


@dataclass
class LatentCache:
    """The cached training split: per-sample latent posterior (mean, std) and text embedding."""

    rows: Dataset  # columns latent_mean, latent_std, text_embedding (torch format)
    empty_prompt: torch.Tensor  # (1, tokens, dim): the empty caption's embedding, for caption dropout
    scaling_factor: float
    fingerprint: str

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
        rows = load_dataset_dir(folder)[SPLIT].with_format("torch")
        return cls(rows, load_file(folder / EMPTY)["empty"], meta["scaling_factor"], meta["fingerprint"])


def features(latent_shape: tuple[int, ...], text_shape: tuple[int, ...]) -> Features:
    return Features(
        {
            "latent_mean": Array3D(latent_shape, "float16"),
            "latent_std": Array3D(latent_shape, "float16"),
            "text_embedding": Array2D(text_shape, "float16"),
        }
    )
