"""Conditions made by a neural model: a transformers pipeline by model id (or folder) and
revision, batched, on a GPU when there is one (with several, the conditions stage runs one
process per GPU). ``depth`` (depth estimation: a continuous map) and ``segmentation`` (semantic
segmentation: a categorical map, a colour per class of the model's labels). The evaluation
re-extracts the condition from generated images with ``conditions.reextract_model`` (best another
model than the one that drew the conditions; null: the same one)."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

from ..core.images import to_rgb
from ..metrics.maps import miou, rmse, ssim
from .condition import Condition, Fidelity, Made
from .maps import MapType


def load_pipeline(task: str, model: str, revision: str | None, device: str | None = None):
    """A transformers pipeline through ``from_pretrained`` (hub id or local folder), fp16 on GPU."""
    import torch
    from transformers import pipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    return pipeline(task, model=model, revision=revision, device=device, dtype=dtype)


def depth_maps(pipe, images: list, batch_size: int) -> list[Image.Image]:
    """Each image's depth, scaled to [0, 255] per image, as an RGB image of the image's size."""
    outs = pipe([to_rgb(im) for im in images], batch_size=batch_size)
    outs = outs if isinstance(outs, list) else [outs]
    maps = []
    for im, out in zip(images, outs):
        d = out["predicted_depth"].float().cpu().numpy().squeeze()
        span = float(d.max() - d.min())
        d = (d - d.min()) / span if span > 0 else np.zeros_like(d)
        grey = Image.fromarray((d * 255).round().astype(np.uint8)).resize(im.size, Image.BILINEAR)
        maps.append(grey.convert("RGB"))
    return maps


def class_palette(n: int) -> np.ndarray:
    """``n`` distinct colours, the same for every run (golden-ratio hues, three brightness levels)."""
    cols = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, (1.0, 0.7, 0.45)[i % 3]) for i in range(n)]
    return (np.array(cols) * 255).round().astype(np.uint8)


def label_maps(pipe, images: list, batch_size: int) -> list[np.ndarray]:
    """Each image's (H, W) class indices from a semantic-segmentation pipeline."""
    label2id = {v: int(k) for k, v in pipe.model.config.id2label.items()}
    outs = pipe([to_rgb(im) for im in images], batch_size=batch_size, subtask="semantic")
    outs = outs if images and isinstance(outs[0], list) else [outs]
    maps = []
    for im, segments in zip(images, outs):
        labels = np.zeros((im.height, im.width), dtype=np.int64)
        for s in segments:
            labels[np.asarray(s["mask"]) > 127] = label2id[s["label"]]
        maps.append(labels)
    return maps


class ModelMade(Condition):
    """The shared part: the pipeline loads once per process, on its device."""

    task: str
    uses_model = True
    device: str | None = None  # set by the conditions stage's process for its GPU

    def pipeline(self):
        if getattr(self, "_pipe", None) is None:
            self._pipe = load_pipeline(self.task, self.c.model, self.c.revision, self.device)
        return self._pipe

    def report(self) -> dict:
        return {"kind": self.name, "model": self.c.model, "revision": self.c.revision, "reextract_model": self.c.reextract_model}

    def reextractor(self):
        """The pipeline the evaluation re-extracts with."""
        return load_pipeline(
            self.task, self.c.reextract_model or self.c.model, self.c.revision if not self.c.reextract_model else None
        )

    def __getstate__(self):  # a worker process loads its own pipeline
        return {k: v for k, v in self.__dict__.items() if k != "_pipe"}


class Depth(ModelMade):
    name = "depth"
    task = "depth-estimation"
    photo_hint = "its depth map, estimated by the model"

    def make_batch(self, images: list, rows: list[dict]) -> list[Made]:
        return [
            Made(m, None, row.get("landmarks")) for m, row in zip(depth_maps(self.pipeline(), images, self.c.batch_size), rows)
        ]

    def map_type(self, conditions: list, resolution: int) -> MapType:
        return MapType("continuous", why=f"continuous: depth estimated by {self.c.model}")

    def fidelity(self, r, folder, extractor) -> Fidelity:
        return DepthFidelity(self.reextractor(), self.c.batch_size, self.c.reextract_model or self.c.model)


class Segmentation(ModelMade):
    name = "segmentation"
    task = "image-segmentation"
    photo_hint = "its semantic segmentation, by the model"

    def palette(self) -> np.ndarray:
        return class_palette(len(self.pipeline().model.config.id2label))

    def make_batch(self, images: list, rows: list[dict]) -> list[Made]:
        pal = self.palette()
        maps = label_maps(self.pipeline(), images, self.c.batch_size)
        return [Made(Image.fromarray(pal[m]), None, row.get("landmarks")) for m, row in zip(maps, rows)]

    def map_type(self, conditions: list, resolution: int) -> MapType:
        from transformers import AutoConfig

        labels = AutoConfig.from_pretrained(self.c.model, revision=self.c.revision).id2label
        palette = tuple(tuple(int(v) for v in c) for c in class_palette(len(labels)))
        names = tuple(labels[i] for i in sorted(labels))
        return MapType("categorical", palette, names, why=f"categorical: the {len(labels)} classes of {self.c.model}")

    def fidelity(self, r, folder, extractor) -> Fidelity:
        return SegmentationFidelity(
            self.reextractor(), self.c.batch_size, self.c.reextract_model or self.c.model, self.map_type([], 0)
        )


class DepthFidelity(Fidelity):
    why = "SSIM and RMSE of the depth a model re-estimates from the image against the condition"

    def __init__(self, pipe, batch_size: int, model: str):
        self.pipe, self.batch_size, self.model = pipe, batch_size, model

    def scores(self, images: list, conditions: list, targets: list) -> dict[str, np.ndarray]:
        got = depth_maps(self.pipe, images, self.batch_size)
        pairs = [
            (np.asarray(g.convert("L"), np.float64) / 255, np.asarray(c.convert("L").resize(g.size), np.float64) / 255)
            for g, c in zip(got, conditions)
        ]
        return {
            "reextracted_ssim": np.array([ssim(a, b) for a, b in pairs]),
            "reextracted_rmse": np.array([rmse(a, b) for a, b in pairs]),
        }


class SegmentationFidelity(Fidelity):
    why = "mIoU of the classes a model re-segments from the image against the condition's"

    def __init__(self, pipe, batch_size: int, model: str, map_type: MapType):
        self.pipe, self.batch_size, self.model, self.map_type = pipe, batch_size, model, map_type

    def scores(self, images: list, conditions: list, targets: list) -> dict[str, np.ndarray]:
        got = label_maps(self.pipe, images, self.batch_size)
        n = len(self.map_type.palette)
        truth = [
            self.map_type.labels(np.asarray(c.convert("RGB").resize((g.shape[1], g.shape[0]), 0)))
            for g, c in zip(got, conditions)
        ]
        return {"reextracted_miou": np.array([miou(g, t, n) for g, t in zip(got, truth)])}
