"""How much of the condition survives the tiny VAE? Trains the embedded default's VAE (the base
stage's own ``train_vae``) under each setting and scores held-out reconstructions with the evaluate
stage's scorer: the VAE's reconstructions bound what any ControlNet on it can reach. Needs the
data and evaluator stages (`dvc repro captions evaluator`).

    python benchmarks/vae_reconstruction.py                            # params.yaml's VAE settings
    python benchmarks/vae_reconstruction.py --variants 1500x8 750x16   # steps x batch (lr: params')

Prints mIoU / NME / seconds per variant (and the real images' ceiling), and writes
benchmarks/results/vae_reconstruction.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    import torch

    from controlnet_recipe.core.config import load_config
    from controlnet_recipe.core.images import images_to_tensor, tensor_to_images
    from controlnet_recipe.core.storage import CAPTIONS_DIR, load_dataset_dir
    from controlnet_recipe.evaluation.scorer import Scorer
    from controlnet_recipe.models import tiny
    from controlnet_recipe.objectives.diffusion import encode_images
    from controlnet_recipe.stages.base import train_vae

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=None, help="STEPSxBATCH[@LR] each (default: params.yaml's)")
    ap.add_argument("--samples", type=int, default=64, help="held-out images scored")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vae_reconstruction.json")
    args = ap.parse_args()

    cfg = load_config(ROOT / "params.yaml")
    r, tb = cfg.recipe, cfg.recipe.base.tiny
    res, cols = r.data.resolution, r.columns
    ds = load_dataset_dir(CAPTIONS_DIR)
    pixels = images_to_tensor(ds["train"][cols.image], res)
    val = ds["validation"].select(range(min(args.samples, len(ds["validation"]))))
    real = [im.convert("RGB") for im in val[cols.image]]
    conditions = [c.convert("RGB") for c in val[cols.conditioning_image]]
    scorer = Scorer(r)
    targets = scorer.condition.targets(val["landmarks"], conditions, res)

    def score(images) -> dict:
        s = scorer.fidelity(images, conditions, targets)
        return {"miou": float(np.nanmean(s["miou"])), "nme": float(np.nanmean(s["nme"]))}

    rows = {"real images (ceiling)": score(real)}
    for spec in args.variants or [f"{tb.vae_steps}x{tb.vae_batch_size}@{tb.vae_learning_rate}"]:
        steps, rest = spec.split("x")
        batch, _, lr = rest.partition("@")
        lr = float(lr or tb.vae_learning_rate)
        vcfg = tb.model_copy(update={"vae_steps": int(steps), "vae_batch_size": int(batch), "vae_learning_rate": lr})
        torch.manual_seed(tb.seed)
        g = torch.Generator().manual_seed(tb.seed)
        vae = tiny.build_vae(res)
        t0 = time.time()
        train_vae(vae, pixels, vcfg, g)
        seconds = time.time() - t0
        mean, _ = encode_images(vae, images_to_tensor(real, res), desc=None)
        with torch.no_grad():
            recon = tensor_to_images(vae.decode(mean).sample)
        rows[spec] = {**score(recon), "seconds": round(seconds, 1)}
        print(f"vae {spec}: {rows[spec]}", flush=True)
    print(f"\n{'variant':<24} {'mIoU':>6} {'NME':>6} {'seconds':>8}")
    for name, row in rows.items():
        print(f"{name:<24} {row['miou']:>6.3f} {row['nme']:>6.3f} {row.get('seconds', ''):>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
