"""The condition extractor: a small U-Net learned on the training pairs (image -> condition map),
whatever the condition. It measures how well a generated image follows its condition, by the
scores that fit the map's type (:mod:`.maps`); its score on real held-out images is the ceiling.
It is the evaluator stage's model, and validation's during training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..core.config import EvaluatorCfg
from ..core.images import images_to_tensor
from ..core.storage import seed_everything
from ..models.fit import fit
from ..models.segmenter import Segmenter, degrade
from .maps import MapType

WEIGHTS = "extractor.pt"  # in models/evaluator, beside the map type it learned
MAP_TYPE = "map_type.json"


class Extractor:
    """The network and the map type it outputs; :meth:`scores` compares images with conditions."""

    def __init__(self, net: Segmenter, map_type: MapType, resolution: int):
        self.net, self.map_type, self.resolution = net.eval(), map_type, resolution

    @property
    def headline(self) -> str:
        return self.map_type.headline

    @torch.no_grad()
    def predict(self, images: list, batch_size: int = 64, size: int | tuple[int, int] | None = None) -> np.ndarray:
        """The maps it reads from [-1, 1] images: classes (N, H, W) or values (N, H, W, 3), at
        ``size`` (default: the square it learned at)."""
        pixels = images_to_tensor(images, size or self.resolution)
        return np.concatenate(
            [self.map_type.decode(self.net(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)]
        )

    def scores(self, images: list, conditions: list) -> dict[str, np.ndarray]:
        """Per image, each score of the map type (the first is the headline). Square conditions
        are scored at the learned resolution; an aspect bucket's at its own size (the net is
        convolutional)."""
        rows: list = [None] * len(images)
        sizes = [c.size if c.size[0] != c.size[1] else self.resolution for c in conditions]
        for size in dict.fromkeys(sizes):
            idx = [i for i, s in enumerate(sizes) if s == size]
            pred = self.predict([images[i] for i in idx], size=size)
            target = self.map_type.targets([conditions[i] for i in idx], size).numpy()
            if self.map_type.kind == "continuous":
                target = target.transpose(0, 2, 3, 1)
            for i, p, t in zip(idx, pred, target):
                rows[i] = self.map_type.score(p, t)
        return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]} if rows else {}

    def save(self, folder: Path) -> None:
        self.net.save(folder / WEIGHTS)
        (folder / MAP_TYPE).write_text(json.dumps({**self.map_type.to_json(), "resolution": self.resolution}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> Extractor | None:
        """The evaluator stage's extractor, or None before that stage has run."""
        if not (folder / WEIGHTS).is_file():
            return None
        d = json.loads((folder / MAP_TYPE).read_text())
        resolution = d.pop("resolution")
        return cls(Segmenter.load(folder / WEIGHTS), MapType.from_json(d), resolution)


def train_extractor(pixels: torch.Tensor, conditions: list, map_type: MapType, cfg: EvaluatorCfg, seed: int) -> Extractor:
    """Learn image -> condition on the training pairs; images are degraded (blur, noise, colour)
    so that soft, generated-looking images read too."""
    resolution = pixels.shape[-1]
    target = map_type.targets(conditions, resolution)
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Segmenter(map_type.channels, width=cfg.width).to(device)
    weight = map_type.class_weight(target)
    weight = weight.to(device) if weight is not None else None

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(pixels), (cfg.batch_size,), generator=g)
        x = degrade(pixels[idx], g).to(device)
        return map_type.loss(model(x), target[idx].to(device), weight)

    fit(model, loss_fn, steps=cfg.steps, lr=cfg.learning_rate, desc=f"evaluator: {map_type.kind} extractor")
    return Extractor(model.cpu(), map_type, resolution)
