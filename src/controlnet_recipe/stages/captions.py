"""captions stage: add a caption to each sample.

Captioners are chosen by ``captions.captioner``: ``attributes`` (from the synthetic generator's
known attributes), ``blip`` (BLIP, batched, fp16 on GPU; with several GPUs, one process per GPU
takes every n-th shard), ``template`` (one fixed text), ``given`` (the source's own captions) and
``none`` (empty captions; caption dropout at training time is ``train.proportion_empty_prompts``).
``prefix`` and ``suffix`` wrap every non-empty caption. Shards already written are kept on rerun.
"""

from __future__ import annotations

import json

from ..core.config import CaptionsCfg, Config
from ..core.storage import (
    CAPTIONS_DIR,
    CONDITIONS_DIR,
    ShardedOutput,
    dataset_key,
    digest,
    each_gpu,
    load_dataset_dir,
    write_json,
    write_shard,
)
from ..faces.synthetic import FaceAttributes, describe


def simple_captions(part, c: CaptionsCfg, caption_column: str) -> list[str]:
    """The captioners that need no model. Reads only the column it needs (no image is decoded)."""
    if c.captioner == "attributes":
        return [describe(FaceAttributes(**json.loads(a))) for a in part["attributes"]]
    if c.captioner == "template":
        return [c.template] * len(part)
    if c.captioner == "given":
        return [t or "" for t in part[caption_column]]
    return [""] * len(part)


def wrap(texts: list[str], c: CaptionsCfg) -> list[str]:
    return [f"{c.prefix}{t}{c.suffix}" if t else t for t in texts]


def caption_shard(part, c: CaptionsCfg, image_column: str, caption_column: str, blip=None):
    """The shard with its caption column filled."""
    if c.captioner == "blip":
        images = part.select_columns([image_column])  # decode only the images BLIP reads
        texts = []
        for lo in range(0, len(part), c.batch_size):
            texts += blip.caption(images[lo : lo + c.batch_size][image_column])
    else:
        texts = simple_captions(part, c, caption_column)
    return part.remove_columns(caption_column).add_column(caption_column, wrap(texts, c))


def _caption_worker(rank: int, world: int, todo: list[tuple[str, int, int, int]], cfg: Config) -> None:
    """One process: captions the shards ``todo[rank::world]`` (on GPU ``rank`` when there are GPUs)."""
    import torch

    from ..core.logs import progress

    r, c = cfg.recipe, cfg.recipe.captions
    blip = None
    if c.captioner == "blip":
        from ..models.captioner import BlipCaptioner

        device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
        blip = BlipCaptioner(c.model, revision=c.revision, device=device, batch_size=c.batch_size)
    ds = load_dataset_dir(CONDITIONS_DIR)
    for split, i, lo, hi in progress(todo[rank::world], desc=f"captions ({c.captioner}, process {rank})", disable=rank > 0):
        part = caption_shard(ds[split].select(range(lo, hi)), c, r.columns.image, r.columns.caption, blip)
        if len(part):
            write_shard(CAPTIONS_DIR, split, i, part)


def build_captions(cfg: Config) -> dict:
    r, c = cfg.recipe, cfg.recipe.captions
    ds = load_dataset_dir(CONDITIONS_DIR)
    out = ShardedOutput(CAPTIONS_DIR, digest(c.model_dump(), r.columns.caption, dataset_key(CONDITIONS_DIR)), stage="captions")
    shard = r.data.shard_size
    plan = [
        (split, i, lo, min(lo + shard, len(data)))
        for split, data in ds.items()
        for i, lo in enumerate(range(0, max(len(data), 1), shard))
    ]
    todo = [p for p in plan if not out.done(p[0], p[1])]
    world = each_gpu(_caption_worker, todo, cfg, gpus=c.captioner == "blip", what="captions")
    for split, i, lo, hi in todo:
        if not out.done(split, i) and hi > lo:
            raise RuntimeError(f"captions: shard {i} of {split} was not written")
        out.shards.setdefault(split, set())
    out.finish()
    ds = load_dataset_dir(CAPTIONS_DIR)
    examples = list(ds["train"].select(range(min(5, len(ds["train"]))))[r.columns.caption])
    return {"captioner": c.captioner, "splits": {s: len(d) for s, d in ds.items()}, "examples": examples, "processes": world}


def main(cfg: Config) -> None:
    report = build_captions(cfg)
    write_json(CAPTIONS_DIR / "report.json", report)
    print(f"captions: {report['captioner']}, e.g. {report['examples'][:1]} -> {CAPTIONS_DIR}")
