"""Shared I/O: stage folders, datasets on disk, JSON reports, images <-> tensors, seeding."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Every stage's output folder, relative to the project root. dvc.yaml names the same paths.
DATA_DIR = Path("data/source")
CONDITIONS_DIR = Path("data/conditions")
CAPTIONS_DIR = Path("data/captions")
CACHE_DIR = Path("data/cache")
BASE_DIR = Path("models/base")
EVALUATOR_DIR = Path("models/evaluator")
CONTROLNET_DIR = Path("models/controlnet")
TRAIN_DIR = Path("train")  # checkpoints/ and live/ (DVCLive) survive reruns, for resuming
EVAL_DIR = Path("eval")


def fresh_dir(path: Path) -> Path:
    """Empty ``path`` (a stage owns its output folder) and return it."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_json(path: Path, obj: Any) -> None:
    """Write atomically, so a crash never leaves half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def load_dataset_dir(path: Path):
    """A stage's dataset (a ``DatasetDict`` saved with ``save_to_disk``), with a clear error if absent."""
    from datasets import disable_caching, load_from_disk

    # map() would otherwise write cache files into the *input* stage's folder, which DVC owns.
    disable_caching()
    if not (path / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"{path}: no dataset here; run the stage that writes it first (dvc repro)")
    return load_from_disk(str(path))


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, L, CMYK, I;16, P) to 8-bit RGB; alpha composited on black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def images_to_tensor(images: list[Image.Image], resolution: int, normalize: bool = True):
    """(N, 3, R, R) float tensor: resize + centre crop as upstream; [-1, 1] if ``normalize``
    (target images), else [0, 1] (conditioning images)."""
    import torch

    out = []
    for img in images:
        img = to_rgb(img)
        w, h = img.size
        s = resolution / min(w, h)
        if (w, h) != (resolution, resolution):
            img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
            left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
        out.append(np.asarray(img, dtype=np.float32) / 255.0)
    t = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    return t * 2 - 1 if normalize else t


def tensor_to_images(t) -> list[Image.Image]:
    """Inverse of :func:`images_to_tensor` for [-1, 1] tensors."""
    arr = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
