"""evaluate stage: does the ControlNet follow its condition?

On held-out conditions, generate with the trained ControlNet and with the base alone, from the
same prompts and seeds. Recover a segmentation from every image with the evaluator and compare it
with the condition: mIoU per face part and mean. The evaluator on the real images is the ceiling.
"""

from __future__ import annotations

import csv

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from tqdm.auto import tqdm

from ..config import Config, EvaluateCfg
from ..faces.draw import PARTS
from ..metrics.segmentation import condition_miou
from ..models.base_model import BaseRef, load_base, pipeline_components
from ..models.segmenter import Segmenter
from ..report.grid import save_grid
from ..storage import (
    CAPTIONS_DIR,
    CONTROLNET_DIR,
    EVAL_DIR,
    EVALUATOR_DIR,
    fresh_dir,
    load_dataset_dir,
    write_json,
)
from .evaluator import WEIGHTS

BATCH = 16


def generate(pipe, prompts: list[str], conditions: list | None, e: EvaluateCfg, resolution: int) -> list:
    """Images for each prompt; sample i always uses seed ``e.seed + i`` whatever the batching."""
    images = []
    for i in tqdm(range(0, len(prompts), BATCH), desc="evaluate: generate", leave=False):
        kw = dict(
            prompt=prompts[i : i + BATCH],
            num_inference_steps=e.num_inference_steps,
            guidance_scale=e.guidance_scale,
            generator=[torch.Generator().manual_seed(e.seed + j) for j in range(i, min(i + BATCH, len(prompts)))],
            height=resolution,
            width=resolution,
        )
        if conditions is not None:
            kw.update(image=conditions[i : i + BATCH], controlnet_conditioning_scale=e.conditioning_scale)
        images += pipe(**kw).images
    return images


def main(cfg: Config) -> None:
    r, e = cfg.recipe, cfg.recipe.evaluate
    res = r.data.resolution
    val = load_dataset_dir(CAPTIONS_DIR)["validation"]
    n = min(e.num_samples, len(val))
    val = val.select(range(n))
    conditions = [c.convert("RGB") for c in val[r.columns.conditioning_image]]
    prompts = list(val[r.columns.caption])
    real = list(val[r.columns.image])

    b = load_base(BaseRef.read())
    controlnet = ControlNetModel.from_pretrained(CONTROLNET_DIR)
    common = pipeline_components(b)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cn_pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **common).to(device)
    base_pipe = StableDiffusionPipeline(**common).to(device)
    for p in (cn_pipe, base_pipe):
        p.set_progress_bar_config(disable=True)

    with_cn = generate(cn_pipe, prompts, conditions, e, res)
    base_only = generate(base_pipe, prompts, None, e, res)

    segmenter = Segmenter.load(EVALUATOR_DIR / WEIGHTS)
    scores = {
        name: condition_miou(segmenter, imgs, conditions, res)
        for name, imgs in (("controlnet", with_cn), ("base", base_only), ("real", real))
    }

    out = fresh_dir(EVAL_DIR)
    for name, imgs in (("controlnet", with_cn), ("base", base_only)):
        (out / "images" / name).mkdir(parents=True)
        for i, img in enumerate(imgs):
            img.save(out / "images" / name / f"{i:04d}.png")
    miou, miou_base, ceiling = scores["controlnet"][0], scores["base"][0], scores["real"][0]
    metrics = {
        "miou": miou,
        "miou_base": miou_base,
        "miou_ceiling": ceiling,
        "miou_ratio": miou / max(miou_base, 1e-8),
        "num_samples": n,
    }
    write_json(out / "metrics.json", metrics)
    write_json(out / "generation.json", {"scheduler": type(cn_pipe.scheduler).__name__, "resolution": res, **e.model_dump()})
    with open(out / "per_part.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["part", "model", "iou"])
        for name, label in (("controlnet", "ControlNet"), ("base", "base alone"), ("real", "real images (ceiling)")):
            for part in PARTS[1:]:
                w.writerow([part, label, f"{scores[name][1].get(part, float('nan')):.4f}"])
    k = min(e.grid_rows, n)
    save_grid(
        [[conditions[i], base_only[i], with_cn[i], real[i]] for i in range(k)],
        out / "grid.png",
        col_titles=["condition", "base", "ControlNet", "ground truth"],
    )
    print(
        f"evaluate: mIoU ControlNet {miou:.3f}, base alone {miou_base:.3f} ({metrics['miou_ratio']:.1f}x), "
        f"ceiling {ceiling:.3f} -> {out}"
    )
