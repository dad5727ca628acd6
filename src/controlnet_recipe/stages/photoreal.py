"""photoreal stage (optional, off by default): the source recipe's stated next step. Every image
goes through Stable Diffusion img2img before the conditions are drawn, so that synthetic renders
look photographic and the ControlNet stops drawing "uncanny" 3D faces. A low ``strength`` keeps
the pose, so ground-truth landmarks still fit.

Disabled, it writes only ``passthrough.json`` naming ``data/source``: nothing is copied.
"""

from __future__ import annotations

import torch

from ..core.config import Config, PhotorealCfg
from ..core.images import encode_png
from ..core.logs import progress
from ..core.storage import DATA_DIR, PHOTOREAL_DIR, ShardedOutput, dataset_key, digest, fresh_dir, load_dataset_dir, write_json
from ..report.grid import save_grid


def load_img2img(p: PhotorealCfg):
    from diffusers import StableDiffusionImg2ImgPipeline

    cuda = torch.cuda.is_available()
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        p.model, revision=p.revision, torch_dtype=torch.float16 if cuda else torch.float32, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda" if cuda else "cpu")


def photoreal_batch(pipe, images: list, p: PhotorealCfg, seeds: list[int]) -> list:
    """img2img at the images' own size (one call per size: aspect buckets), one seed per image
    (reproducible whatever the batching)."""
    out: list = [None] * len(images)
    for size in dict.fromkeys(im.size for im in images):
        idx = [i for i, im in enumerate(images) if im.size == size]
        made = pipe(
            prompt=[p.prompt] * len(idx),
            image=[images[i].convert("RGB") for i in idx],
            strength=p.strength,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            generator=[torch.Generator().manual_seed(seeds[i]) for i in idx],
        ).images
        for i, im in zip(idx, made):
            out[i] = im.resize(size)
    return out


def build_photoreal(cfg: Config) -> dict:
    r, p = cfg.recipe, cfg.recipe.photoreal
    if not p.enabled:
        fresh_dir(PHOTOREAL_DIR)
        write_json(PHOTOREAL_DIR / "passthrough.json", {"dataset": str(DATA_DIR)})
        return {"enabled": False}
    ds = load_dataset_dir(DATA_DIR)
    out = ShardedOutput(PHOTOREAL_DIR, digest(p.model_dump(), dataset_key(DATA_DIR)), stage="photoreal")
    pipe = load_img2img(p)
    col, shard = r.columns.image, r.data.shard_size
    for split, data in ds.items():
        for i, lo in enumerate(range(0, max(len(data), 1), shard)):
            if out.done(split, i):
                continue
            part = data.select(range(lo, min(lo + shard, len(data))))
            new = []
            for b in progress(range(0, len(part), p.batch_size), desc=f"photoreal ({split}, shard {i})"):
                imgs = part[b : b + p.batch_size][col]
                new += photoreal_batch(pipe, imgs, p, [p.seed + lo + b + k for k in range(len(imgs))])
            encoded = [{"bytes": encode_png(im), "path": None} for im in new]
            out.write(split, i, part.remove_columns(col).add_column(col, encoded, feature=part.features[col]))
    out.finish()
    after = load_dataset_dir(PHOTOREAL_DIR)
    if "train" in after and len(after["train"]):  # the preview from the finished datasets: resumed or not
        n = min(4, len(after["train"]))
        pairs = zip(ds["train"].select(range(n))[col], after["train"].select(range(n))[col])
        save_grid([[a, b] for a, b in pairs], PHOTOREAL_DIR / "samples.png", col_titles=["render", "img2img"])
    return {"enabled": True, "model": p.model, "strength": p.strength}


def main(cfg: Config) -> None:
    report = build_photoreal(cfg)
    write_json(PHOTOREAL_DIR / "report.json", report)
    print(f"photoreal: {report} -> {PHOTOREAL_DIR}")
