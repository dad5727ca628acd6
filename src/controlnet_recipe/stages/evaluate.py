"""evaluate stage: does the ControlNet work, and which checkpoint should ship?

1. The base alone, on held-out conditions' prompts, and on the forgetting probes: the floor.
2. Sweep: every saved checkpoint on a subset (fidelity, CLIP score, probe survival, faces).
3. The rule picks a checkpoint; it is exported to ``models/best`` (what generate, the web demo
   and publish use) and evaluated on the whole held-out set: fidelity (NME, failures, redrawn
   mIoU / edge F1), FID/KID against the real images, CLIP score, forgetting, each with a 95%
   bootstrap interval, paired with the base by (condition, seed). The real images are the ceiling.
4. ``eval/metrics.json`` (dvc metrics), curves and tables (dvc plots), and ``eval/report.html``.
"""

from __future__ import annotations

import csv
import shutil

import numpy as np

from ..config import Config
from ..evaluation.probes import ProbeSet, probe_scores
from ..evaluation.quality import fid_kid
from ..evaluation.sampling import Sampler
from ..evaluation.scorer import Scorer, target_landmarks
from ..evaluation.stats import mean_ci, paired_diff_ci
from ..evaluation.sweep import candidates, choose, load_controlnet
from ..metrics.clip import to_uint8
from ..metrics.landmarks import REGIONS
from ..models.base_model import BaseRef, load_base
from ..report.grid import save_grid
from ..report.html import write_report
from ..report.plots import plot_sweep
from ..storage import (
    BEST_DIR,
    CAPTIONS_DIR,
    CONTROLNET_DIR,
    EVAL_DIR,
    TRAIN_DIR,
    fresh_dir,
    load_dataset_dir,
    read_json,
    write_json,
)


def summarize(scores: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, list[float]]:
    """Each per-image score -> [mean, low, high]."""
    return {k: list(mean_ci(v, n_boot, seed)) for k, v in scores.items()}


def main(cfg: Config) -> None:
    r, e = cfg.recipe, cfg.recipe.evaluate
    res, cols = r.data.resolution, r.columns
    val = load_dataset_dir(CAPTIONS_DIR)["validation"]
    n = min(e.num_samples, len(val))
    val = val.select(range(n))
    conditions = [c.convert("RGB") for c in val[cols.conditioning_image]]
    prompts, real = list(val[cols.caption]), [im.convert("RGB") for im in val[cols.image]]
    targets = target_landmarks(val["landmarks"], conditions, res) if "landmarks" in val.column_names else [None] * n
    seeds = [e.seed + i for i in range(n)]
    m = min(e.sweep.num_samples, n)
    probes = ProbeSet.build(e.probes, conditions[: e.probe_conditions], e.seed)

    sampler = Sampler(load_base(BaseRef.read()), e, res)
    scorer = Scorer(r)
    fk = scorer.fidelity_key

    def score(images: list, k: int) -> dict[str, np.ndarray]:
        return {**scorer.fidelity(images, conditions[:k], targets[:k]), "clip_score": scorer.clip_score(images, prompts[:k])}

    # 1. The floor (base alone) and the ceiling (real images), on the same conditions and prompts.
    base_images = sampler.generate(prompts, seeds, desc="base")
    base_probe_images = sampler.generate(probes.prompts, probes.seeds, desc="base probes")
    base_scores, real_scores = score(base_images, n), score(real, n)
    base_probe = probe_scores(scorer, probes, base_probe_images)

    # 2. The sweep, on the first m conditions (the base's first m images are the same images).
    final_step = read_json(CONTROLNET_DIR / "training.json")["steps"]
    rows, probe_images = [], {}
    for c in candidates(TRAIN_DIR / "checkpoints", CONTROLNET_DIR, final_step):
        controlnet = load_controlnet(c, CONTROLNET_DIR)
        imgs = sampler.generate(prompts[:m], seeds[:m], controlnet, conditions[:m], desc=f"step {c.step}")
        pimgs = sampler.generate(probes.prompts, probes.seeds, controlnet, probes.conditions, desc=f"step {c.step} probes")
        s, p = score(imgs, m), probe_scores(scorer, probes, pimgs)
        row = {"step": c.step, **{k: float(np.nanmean(v)) for k, v in s.items()}}
        row.update(
            concept_survival=float(p["survived"].mean()),
            face_rate=float(p["face"].mean()),
            forgetting=float(base_probe["survived"].mean() - p["survived"].mean()),
        )
        rows.append(row)
        probe_images[c.step] = (c, pimgs, p)
        print(f"evaluate: step {c.step}: {fk} {row[fk]:.3f}, CLIP {row['clip_score']:.1f}, forgetting {row['forgetting']:+.2f}")
    base_row = {"step": 0, **{k: float(np.nanmean(v[:m])) for k, v in base_scores.items()}}
    base_row.update(
        concept_survival=float(base_probe["survived"].mean()), face_rate=float(base_probe["face"].mean()), forgetting=0.0
    )
    chosen, why = choose(rows, fk, e.sweep.tolerance, e.sweep.max_forgetting)
    c, cn_probe_images, cn_probe = probe_images[chosen["step"]]
    print(f"evaluate: chose step {chosen['step']}: {why}")

    # 3. The chosen checkpoint on the whole held-out set, exported for generate/web/publish.
    controlnet = load_controlnet(c, CONTROLNET_DIR)
    best = fresh_dir(BEST_DIR)
    controlnet.save_pretrained(best)  # fp32, before sampling casts it
    cn_images = sampler.generate(prompts, seeds, controlnet, conditions, desc=f"step {c.step} (chosen)")
    cn_scores = score(cn_images, n)
    if (CONTROLNET_DIR / "training.json").is_file():
        shutil.copy(CONTROLNET_DIR / "training.json", best / "training.json")
    write_json(best / "chosen.json", {"step": c.step, "source": str(c.path), "rule": why})

    real_u8 = to_uint8(real, res)
    features = scorer.clip.feature_module()
    quality = {
        "controlnet": fid_kid(real_u8, to_uint8(cn_images, res), features, e.seed),
        "base": fid_kid(real_u8, to_uint8(base_images, res), features, e.seed),
    }
    b = e.bootstrap
    summary = {
        "controlnet": summarize(cn_scores, b, e.seed),
        "base": summarize(base_scores, b, e.seed),
        "real": summarize(real_scores, b, e.seed),
        "paired_difference": {k: list(paired_diff_ci(cn_scores[k], base_scores[k], b, e.seed)) for k in cn_scores},
        "probes": {
            "controlnet": summarize(cn_probe, b, e.seed),
            "base": summarize(base_probe, b, e.seed),
            "forgetting": list(paired_diff_ci(base_probe["survived"], cn_probe["survived"], b, e.seed)),
        },
        "quality": quality,
    }
    diff = summary["paired_difference"][fk]
    metrics = {
        "fidelity_metric": fk,
        "fidelity": float(np.nanmean(cn_scores[fk])),
        "fidelity_base": float(np.nanmean(base_scores[fk])),
        "fidelity_ceiling": float(np.nanmean(real_scores[fk])),
        "fidelity_gain": diff[0],
        "fidelity_gain_low": diff[1],
        "fidelity_gain_high": diff[2],
        "beats_base": bool(diff[1] > 0),
        "clip_score": float(np.nanmean(cn_scores["clip_score"])),
        "clip_score_base": float(np.nanmean(base_scores["clip_score"])),
        "clip_score_real": float(np.nanmean(real_scores["clip_score"])),
        "fid": quality["controlnet"]["fid"],
        "fid_base": quality["base"]["fid"],
        "kid": quality["controlnet"]["kid"],
        "kid_base": quality["base"]["kid"],
        "concept_survival": float(cn_probe["survived"].mean()),
        "concept_survival_base": float(base_probe["survived"].mean()),
        "forgetting": summary["probes"]["forgetting"][0],
        "face_rate_probes": float(cn_probe["face"].mean()),
        "face_rate_probes_base": float(base_probe["face"].mean()),
        "chosen_step": c.step,
        "num_samples": n,
    }
    if r.conditions.kind == "face_segmentation":
        for name, s in (("", cn_scores), ("_base", base_scores), ("_ceiling", real_scores)):
            metrics[f"nme{name}"] = float(np.nanmean(s["nme"])) if np.isfinite(s["nme"]).any() else None
            metrics[f"nme_median{name}"] = float(np.nanmedian(s["nme"])) if np.isfinite(s["nme"]).any() else None
            metrics[f"detection_failure_rate{name}"] = float(1 - np.nanmean(s["found"]))
            metrics[f"miou{name}"] = float(np.nanmean(s["miou"]))

    # 4. Files: images (PNG), metrics, curves, grids, report.
    out = fresh_dir(EVAL_DIR)
    for name, imgs in (
        ("controlnet", cn_images),
        ("base", base_images),
        ("probes_controlnet", cn_probe_images),
        ("probes_base", base_probe_images),
    ):
        (out / "images" / name).mkdir(parents=True)
        for i, img in enumerate(imgs):
            img.save(out / "images" / name / f"{i:04d}.png")
    write_json(out / "metrics.json", metrics)
    write_json(out / "summary.json", summary)
    write_json(
        out / "generation.json",
        {
            **sampler.settings(),
            "seeds": f"{seeds[0]}..{seeds[-1]} (one per condition)",
            "probe_seeds": f"{probes.seeds[0]}..{probes.seeds[-1]}",
            "clip": {"sha256": scorer.clip.sha256},
        },
    )
    keys = [k for k in rows[0] if k != "step"]
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *keys, "chosen"])
        for row in rows:
            w.writerow([row["step"], *[f"{row[k]:.5f}" for k in keys], int(row["step"] == c.step)])
    plot_sweep(rows, base_row, fk, c.step, out / "sweep.png")
    with open(out / "per_region.csv", "w", newline="") as f:  # header only for conditions without landmarks
        w = csv.writer(f)
        w.writerow(["region", "model", "nme"])
        for label, s in (("ControlNet", cn_scores), ("base alone", base_scores), ("real images (ceiling)", real_scores)):
            for region in REGIONS if "nme" in s else ():
                v = s[f"nme_{region}"]
                w.writerow([region, label, f"{np.nanmean(v):.4f}" if np.isfinite(v).any() else "nan"])
    k = min(e.grid_rows, n)
    save_grid(
        [[conditions[i], base_images[i], cn_images[i], real[i]] for i in range(k)],
        out / "grid.png",
        col_titles=["condition", "base", f"ControlNet (step {c.step})", "ground truth"],
    )
    per = e.probe_conditions  # probe j's images are j*per .. j*per+per-1, one per condition
    shown = range(min(per, 2))
    save_grid(
        [
            [
                x
                for k in shown
                for x in (probes.conditions[j * per + k], base_probe_images[j * per + k], cn_probe_images[j * per + k])
            ]
            for j in range(len(e.probes))
        ],
        out / "probes.png",
        col_titles=[t for _ in shown for t in ("condition", "base", "ControlNet")],
    )
    write_report(out, cfg, metrics, summary, rows, why, sampler.settings())
    print(
        f"evaluate: step {c.step}: {fk} {metrics['fidelity']:.3f} vs base {metrics['fidelity_base']:.3f} "
        f"(gain {diff[0]:+.3f}, 95% CI {diff[1]:+.3f}..{diff[2]:+.3f}), ceiling {metrics['fidelity_ceiling']:.3f}; "
        f"CLIP {metrics['clip_score']:.1f} vs {metrics['clip_score_base']:.1f}; "
        f"FID {metrics['fid']:.2f} vs {metrics['fid_base']:.2f}; "
        f"forgetting {metrics['forgetting']:+.2f} -> {out}/report.html"
    )
    if r.evaluate.push_to_hub:  # upstream's flag; what is pushed is the chosen checkpoint, once evaluated
        from ..publish import push_to_hub

        push_to_hub(cfg)
