"""cache stage: encode VAE latents and text embeddings once, so training never runs the VAE or the
text encoder (upstream runs both on every step) and keeps them out of GPU memory.

The cache lives in ``data/cache/<fingerprint>/``, the fingerprint covering the dataset, the base
model and the resolution. It is written in shards, each renamed into place when complete, so an
interrupted run resumes at the first missing shard; a changed dataset or model gets a new folder.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Array2D, Array3D, Dataset, Features, concatenate_datasets, load_from_disk
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..codedeps import stage_code_digest
from ..config import Config
from ..diffusion import caption_embeddings, encode_images
from ..errors import MissingInput
from ..models.base_model import BaseRef, load_base
from ..storage import CACHE_DIR, CAPTIONS_DIR, atomic_dir, images_to_tensor, load_dataset_dir, read_json, write_json

META = "cache.json"
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
            raise ValueError(
                f"{meta_file}: made for another dataset or base model (fingerprint {meta['fingerprint']}, "
                f"expected {expected_fingerprint}); run the cache stage again (dvc repro cache)"
            )
        folder = root / meta["fingerprint"]
        shards = [load_from_disk(str(folder / s)) for s in meta["shards"]]
        rows = concatenate_datasets(shards).with_format("torch")
        return cls(rows, load_file(folder / EMPTY)["empty"], meta["scaling_factor"], meta["fingerprint"])


def _features(latent_shape: tuple[int, ...], text_shape: tuple[int, ...]) -> Features:
    return Features(
        {
            "latent_mean": Array3D(latent_shape, "float16"),
            "latent_std": Array3D(latent_shape, "float16"),
            "text_embedding": Array2D(text_shape, "float16"),
        }
    )


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
    code = folder / ".code"  # shards are kept only for the code that wrote them
    if folder.is_dir() and not (code.is_file() and code.read_text() == stage_code_digest("cache")):
        shutil.rmtree(folder)
    folder.mkdir(exist_ok=True)
    code.write_text(stage_code_digest("cache"))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_base(ref)
    vae, text_encoder = base.vae.to(device).eval(), base.text_encoder.to(device).eval()
    empty = caption_embeddings(base.tokenizer, text_encoder, [""])[1]
    save_file({"empty": empty.contiguous()}, folder / EMPTY)

    n_shards = math.ceil(len(train) / c.shard_size)
    names = [f"shard-{i:05d}" for i in range(n_shards)]
    todo = [i for i, name in enumerate(names) if not (folder / name / "dataset_info.json").is_file()]
    if len(todo) < n_shards:
        print(f"cache: resuming, {n_shards - len(todo)} of {n_shards} shards already done")
    for i in tqdm(todo, desc="cache: shards"):
        rows = train.select(range(i * c.shard_size, min((i + 1) * c.shard_size, len(train))))
        means, stds, texts = [], [], []
        for start in range(0, len(rows), c.batch_size):
            batch = rows[start : start + c.batch_size]
            pixels = images_to_tensor(batch[r.columns.image], r.data.resolution)
            mean, std = encode_images(vae, pixels, batch_size=c.batch_size, desc=None)
            means.append(mean.half())
            stds.append(std.half())
            texts.append(caption_embeddings(base.tokenizer, text_encoder, list(batch[r.columns.caption]))[0].half())
        mean, std, text = torch.cat(means), torch.cat(stds), torch.cat(texts)
        shard = Dataset.from_dict(
            {"latent_mean": mean.numpy(), "latent_std": std.numpy(), "text_embedding": text.numpy()},
            features=_features(tuple(mean.shape[1:]), tuple(text.shape[1:])),
        )
        with atomic_dir(folder / names[i]) as tmp:
            shard.save_to_disk(str(tmp))
    meta = {
        "fingerprint": fp,
        "shards": names,
        "num_rows": len(train),
        "scaling_factor": float(vae.config.scaling_factor),
        "base": ref.__dict__,
        "resolution": r.data.resolution,
    }
    write_json(root / META, meta)
    return meta


def main(cfg: Config) -> None:
    meta = build_cache(cfg)
    print(f"cache: {meta['num_rows']} samples in {len(meta['shards'])} shards -> {CACHE_DIR / meta['fingerprint']}")
