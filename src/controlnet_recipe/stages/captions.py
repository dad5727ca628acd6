"""captions stage: add a caption to each sample.

Captioners are a registry chosen by ``captions.captioner``: ``attributes`` (from the synthetic
generator's known attributes) and ``none`` (empty captions). Each takes a batch and returns texts.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ..config import CaptionsCfg, Config
from ..faces.synthetic import FaceAttributes, describe
from ..storage import CAPTIONS_DIR, CONDITIONS_DIR, fresh_dir, load_dataset_dir, write_json


def attributes_captioner(batch: dict, image_column: str) -> list[str]:
    return [describe(FaceAttributes(**json.loads(a))) for a in batch["attributes"]]


def none_captioner(batch: dict, image_column: str) -> list[str]:
    return [""] * len(batch[image_column])


CAPTIONERS: dict[str, Callable[[dict, str], list[str]]] = {"attributes": attributes_captioner, "none": none_captioner}


def caption_batch(batch: dict, cfg: CaptionsCfg, image_column: str, out_column: str) -> dict:
    texts = CAPTIONERS[cfg.captioner](batch, image_column)
    return {out_column: [f"{cfg.prefix}{t}{cfg.suffix}" if t else t for t in texts]}


def main(cfg: Config) -> None:
    r = cfg.recipe
    ds = load_dataset_dir(CONDITIONS_DIR)
    ds = ds.map(
        caption_batch,
        batched=True,
        batch_size=256,
        fn_kwargs={"cfg": r.captions, "image_column": r.columns.image, "out_column": r.columns.caption},
        desc="captions",
    )
    out = fresh_dir(CAPTIONS_DIR)
    ds.save_to_disk(str(out))
    examples = list(ds["train"].select(range(min(5, len(ds["train"]))))[r.columns.caption])
    write_json(
        out / "report.json",
        {"captioner": r.captions.captioner, "splits": {s: len(d) for s, d in ds.items()}, "examples": examples},
    )
    print(f"captions: {r.captions.captioner}, e.g. {examples[0]!r} -> {out}")
