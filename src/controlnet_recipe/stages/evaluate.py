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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..adapters import ADAPTER_FILE, adapter_of, settings_of
from ..core.config import Config
from ..core.storage import (
    ADAPTER_DIR,
    BEST_DIR,
    CAPTIONS_DIR,
    EVAL_DIR,
    TRAIN_DIR,
    fresh_dir,
    load_dataset_dir,
    read_json,
    write_json,
)
from ..evaluation.probes import ProbeSet, probe_scores
from ..evaluation.quality import fid_kid
from ..evaluation.sampling import Sampler
from ..evaluation.scorer import Scorer
from ..evaluation.stats import mean_ci, paired_diff_ci
from ..evaluation.sweep import candidates, choose, load_controlnet
from ..metrics.clip import to_uint8
from ..models.base_model import BaseRef, load_base
from ..report.grid import save_grid
from ..report.html import write_report
from ..report.plots import plot_sweep


def summarize(scores: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, list[float]]:
    """Each per-image score -> [mean, low, high]."""
    return {k: list(mean_ci(v, n_boot, seed)) for k, v in scores.items()}


@dataclass
class HeldOut:
    """The held-out conditions the evaluation runs on, with everything scored against them."""

    conditions: list
    prompts: list[str]
    real: list
    targets: list
    seeds: list[int]
    probes: ProbeSet
    sampler: Sampler
    scorer: Scorer
    bucketed: bool = False  # aspect buckets: each image at its condition's size (else square at the resolution)

    def score(self, images: list) -> dict[str, np.ndarray]:
        """Per-image fidelity and CLIP score of images made from the first ``len(images)`` conditions."""
        k = len(images)
        fid = self.scorer.fidelity(images, self.conditions[:k], self.targets[:k])
        return {**fid, "clip_score": self.scorer.clip_score(images, self.prompts[:k])}

    def generate(self, k: int, controlnet=None, desc: str = "") -> list:
        """Images of the first ``k`` held-out samples, each at its condition's size (its aspect bucket)."""
        c = self.conditions[:k] if controlnet is not None else None
        sizes = [x.size for x in self.conditions[:k]] if self.bucketed else None
        return self.sampler.generate(self.prompts[:k], self.seeds[:k], controlnet, c, desc=desc, sizes=sizes)

    def generate_probes(self, controlnet=None, desc: str = "") -> list:
        c = self.probes.conditions if controlnet is not None else None
        sizes = [x.size for x in self.probes.conditions] if self.bucketed else None
        return self.sampler.generate(self.probes.prompts, self.probes.seeds, controlnet, c, desc=desc, sizes=sizes)


def load_held_out(cfg: Config) -> HeldOut:
    r, e = cfg.recipe, cfg.recipe.evaluate
    res, cols = r.data.resolution, r.columns
    val = load_dataset_dir(CAPTIONS_DIR)["validation"]
    n = min(e.num_samples, len(val))
    val = val.select(range(n))
    conditions = [c.convert("RGB") for c in val[cols.conditioning_image]]
    scorer = Scorer(r)
    landmarks = val["landmarks"] if "landmarks" in val.column_names else None
    targets = scorer.condition.targets(landmarks, conditions, res)
    return HeldOut(
        conditions=conditions,
        prompts=list(val[cols.caption]),
        real=[im.convert("RGB") for im in val[cols.image]],
        targets=targets,
        seeds=[e.seed + i for i in range(n)],
        probes=ProbeSet.build(e.probes, conditions[: e.probe_conditions], e.seed),
        sampler=Sampler(load_base(BaseRef.read()), e, res, adapter_of(ADAPTER_DIR)),
        scorer=scorer,
        bucketed="bucket" in val.column_names,
    )


@dataclass
class Scored:
    """One model's images on the held-out set and on the probes, with their scores."""

    images: list
    scores: dict[str, np.ndarray]
    probe_images: list
    probe: dict[str, np.ndarray]


def score_model(h: HeldOut, k: int, controlnet=None, desc: str = "base") -> Scored:
    images = h.generate(k, controlnet, desc=desc)
    probe_images = h.generate_probes(controlnet, desc=f"{desc} probes")
    return Scored(images, h.score(images), probe_images, probe_scores(h.scorer, h.probes, probe_images))


def sweep(h: HeldOut, base: Scored, m: int) -> tuple[list[dict], dict[int, tuple]]:
    """Every checkpoint on the first ``m`` conditions: one row of mean scores each."""
    fk = h.scorer.fidelity_key
    training = read_json(ADAPTER_DIR / "training.json")
    final_step = training["steps"]
    rows, found = [], {}
    # the checkpoints of the run that made the ControlNet (other runs' stay beside them, untouched)
    for c in candidates(Path(training.get("checkpoints", TRAIN_DIR / "checkpoints")), ADAPTER_DIR, final_step):
        s = score_model(h, m, load_controlnet(c, ADAPTER_DIR), desc=f"step {c.step}")
        row = {
            "step": c.step,
            "fidelity": float(np.nanmean(s.scores[fk])),
            **{k: float(np.nanmean(v)) for k, v in s.scores.items()},
        }
        row.update(
            concept_survival=float(s.probe["survived"].mean()),
            **({"face_rate": float(s.probe["face"].mean())} if "face" in s.probe else {}),
            forgetting=float(base.probe["survived"].mean() - s.probe["survived"].mean()),
        )
        rows.append(row)
        found[c.step] = (c, s)
        print(f"evaluate: step {c.step}: {fk} {row[fk]:.3f}, CLIP {row['clip_score']:.1f}, forgetting {row['forgetting']:+.2f}")
    return rows, found


def base_row(base: Scored, m: int, fk: str) -> dict:
    row = {
        "step": 0,
        "fidelity": float(np.nanmean(base.scores[fk][:m])),
        **{k: float(np.nanmean(v[:m])) for k, v in base.scores.items()},
    }
    row.update(concept_survival=float(base.probe["survived"].mean()), forgetting=0.0)
    if "face" in base.probe:
        row["face_rate"] = float(base.probe["face"].mean())
    return row


def export_chosen(c, swept: Scored, h: HeldOut, why: str) -> Scored:
    """The chosen checkpoint to ``models/best`` (fp32), then scored on the whole held-out set
    (the sweep's own images and scores when it already drew every held-out condition: each image
    comes from its own seed, so drawing them again would give the same images, up to a rounding
    level in a few pixels where the CPU's kernels depend on the batch size)."""
    controlnet = load_controlnet(c, ADAPTER_DIR)
    best = fresh_dir(BEST_DIR)
    adapter_of(ADAPTER_DIR).save(controlnet, best, settings_of(ADAPTER_DIR))  # fp32, before sampling casts it
    for f in ("training.json", ADAPTER_FILE):
        if (ADAPTER_DIR / f).is_file():
            shutil.copy(ADAPTER_DIR / f, best / f)
    write_json(best / "chosen.json", {"step": c.step, "source": str(c.path), "rule": why})
    if len(swept.images) == len(h.conditions):  # the sweep drew every held-out condition
        return swept
    images = h.generate(len(h.conditions), controlnet, desc=f"step {c.step} (chosen)")
    return Scored(images, h.score(images), swept.probe_images, swept.probe)


def summarize_all(h: HeldOut, cn: Scored, base: Scored, real: dict, cfg: Config) -> dict:
    """Every score's mean with its interval, paired differences with the base, FID/KID."""
    e, res = cfg.recipe.evaluate, cfg.recipe.data.resolution
    b = e.bootstrap
    real_u8 = to_uint8(h.real, res)
    features = h.scorer.clip.feature_module()
    sc = h.scorer
    return {
        "fidelity": {
            "metric": sc.fidelity_key,
            "why": sc.fidelity_why,
            "map_type": sc.extractor.map_type.kind if sc.extractor else None,
            "map_type_why": sc.extractor.map_type.why if sc.extractor else None,
        },
        "controlnet": summarize(cn.scores, b, e.seed),
        "base": summarize(base.scores, b, e.seed),
        "real": summarize(real, b, e.seed),
        "paired_difference": {k: list(paired_diff_ci(cn.scores[k], base.scores[k], b, e.seed)) for k in cn.scores},
        "probes": {
            "controlnet": summarize(cn.probe, b, e.seed),
            "base": summarize(base.probe, b, e.seed),
            "forgetting": list(paired_diff_ci(base.probe["survived"], cn.probe["survived"], b, e.seed)),
        },
        "quality": {
            "controlnet": fid_kid(real_u8, to_uint8(cn.images, res), features, e.seed),
            "base": fid_kid(real_u8, to_uint8(base.images, res), features, e.seed),
        },
    }


def headline_metrics(fk: str, cn: Scored, base: Scored, real: dict, summary: dict, step: int) -> dict:
    """``eval/metrics.json``: what ``dvc metrics show`` prints."""
    diff = summary["paired_difference"][fk]
    quality = summary["quality"]
    metrics = {
        "fidelity_metric": fk,
        "fidelity": float(np.nanmean(cn.scores[fk])),
        "fidelity_base": float(np.nanmean(base.scores[fk])),
        "fidelity_ceiling": float(np.nanmean(real[fk])),
        "fidelity_gain": diff[0],
        "fidelity_gain_low": diff[1],
        "fidelity_gain_high": diff[2],
        "beats_base": bool(diff[1] > 0),
        "clip_score": float(np.nanmean(cn.scores["clip_score"])),
        "clip_score_base": float(np.nanmean(base.scores["clip_score"])),
        "clip_score_real": float(np.nanmean(real["clip_score"])),
        "fid": quality["controlnet"]["fid"],
        "fid_base": quality["base"]["fid"],
        "kid": quality["controlnet"]["kid"],
        "kid_base": quality["base"]["kid"],
        "concept_survival": float(cn.probe["survived"].mean()),
        "concept_survival_base": float(base.probe["survived"].mean()),
        "forgetting": summary["probes"]["forgetting"][0],
        "chosen_step": step,
        "num_samples": len(cn.images),
    }
    if "face" in cn.probe:  # face conditions
        metrics.update(face_rate_probes=float(cn.probe["face"].mean()), face_rate_probes_base=float(base.probe["face"].mean()))
    if "nme" in cn.scores:  # face conditions: landmark error and the redrawn map
        for name, s in (("", cn.scores), ("_base", base.scores), ("_ceiling", real)):
            metrics[f"nme{name}"] = float(np.nanmean(s["nme"])) if np.isfinite(s["nme"]).any() else None
            metrics[f"nme_median{name}"] = float(np.nanmedian(s["nme"])) if np.isfinite(s["nme"]).any() else None
            metrics[f"detection_failure_rate{name}"] = float(1 - np.nanmean(s["found"]))
            metrics[f"miou{name}"] = float(np.nanmean(s["miou"]))
    return metrics


def write_outputs(cfg: Config, h: HeldOut, cn: Scored, base: Scored, real: dict, result: dict) -> Path:
    """Images, metrics, curves, grids and the HTML report, into a fresh ``eval/``."""
    e = cfg.recipe.evaluate
    metrics, summary, rows, step = result["metrics"], result["summary"], result["rows"], result["step"]
    title = adapter_of(ADAPTER_DIR).title  # the kind of control: ControlNet, T2I-Adapter, ...
    out = fresh_dir(EVAL_DIR)
    for name, imgs in (
        ("controlnet", cn.images),
        ("base", base.images),
        ("probes_controlnet", cn.probe_images),
        ("probes_base", base.probe_images),
    ):
        (out / "images" / name).mkdir(parents=True)
        for i, img in enumerate(imgs):
            img.save(out / "images" / name / f"{i:04d}.png")
    write_json(out / "metrics.json", metrics)
    write_json(out / "summary.json", summary)
    write_json(
        out / "generation.json",
        {
            **h.sampler.settings(),
            "seeds": f"{h.seeds[0]}..{h.seeds[-1]} (one per condition)",
            "probe_seeds": f"{h.probes.seeds[0]}..{h.probes.seeds[-1]}",
            "clip": {"sha256": h.scorer.clip.sha256},
        },
    )
    keys = [k for k in rows[0] if k != "step"]
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *keys, "chosen"])
        for row in rows:
            w.writerow([row["step"], *[f"{row[k]:.5f}" for k in keys], int(row["step"] == step)])
    plot_sweep(rows, result["base_row"], h.scorer.fidelity_key, step, out / "sweep.png", title)
    with open(out / "fidelity.csv", "w", newline="") as f:  # every fidelity score, per model (a bar chart)
        w = csv.writer(f)
        w.writerow(["metric", "model", "value"])
        for label, s in ((title, cn.scores), ("base alone", base.scores), ("real images (ceiling)", real)):
            for k, v in s.items():
                if k != "clip_score":
                    w.writerow([k, label, f"{np.nanmean(v):.4f}" if np.isfinite(v).any() else "nan"])
    k = min(e.grid_rows, len(h.conditions))
    save_grid(
        [[h.conditions[i], base.images[i], cn.images[i], h.real[i]] for i in range(k)],
        out / "grid.png",
        col_titles=["condition", "base", f"{title} (step {step})", "ground truth"],
    )
    per = e.probe_conditions  # probe j's images are j*per .. j*per+per-1, one per condition
    shown = range(min(per, 2))
    save_grid(
        [
            [
                x
                for k in shown
                for x in (h.probes.conditions[j * per + k], base.probe_images[j * per + k], cn.probe_images[j * per + k])
            ]
            for j in range(len(e.probes))
        ],
        out / "probes.png",
        col_titles=[t for _ in shown for t in ("condition", "base", title)],
    )
    write_report(out, cfg, metrics, summary, rows, result["why"], h.sampler.settings(), title)
    return out


def main(cfg: Config) -> None:
    e = cfg.recipe.evaluate
    h = load_held_out(cfg)
    fk, n = h.scorer.fidelity_key, len(h.conditions)
    m = min(e.sweep.num_samples, n)
    # 1. The floor (base alone) and the ceiling (real images), on the same conditions and prompts.
    base = score_model(h, n)
    real = h.score(h.real)
    # 2. The sweep, on the first m conditions (the base's first m images are the same images).
    rows, swept = sweep(h, base, m)
    chosen, why = choose(rows, fk, e.sweep.tolerance, e.sweep.max_forgetting)
    c, s = swept[chosen["step"]]
    print(f"evaluate: chose step {c.step}: {why}")
    # 3. The chosen checkpoint on the whole held-out set, exported for generate/web/publish.
    cn = export_chosen(c, s, h, why)
    summary = summarize_all(h, cn, base, real, cfg)
    metrics = headline_metrics(fk, cn, base, real, summary, c.step)
    # 4. Files: images (PNG), metrics, curves, grids, report.
    result = {"metrics": metrics, "summary": summary, "rows": rows, "base_row": base_row(base, m, fk), "step": c.step, "why": why}
    out = write_outputs(cfg, h, cn, base, real, result)
    diff = summary["paired_difference"][fk]
    print(
        f"evaluate: step {c.step}: {fk} {metrics['fidelity']:.3f} vs base {metrics['fidelity_base']:.3f} "
        f"(gain {diff[0]:+.3f}, 95% CI {diff[1]:+.3f}..{diff[2]:+.3f}), ceiling {metrics['fidelity_ceiling']:.3f}; "
        f"CLIP {metrics['clip_score']:.1f} vs {metrics['clip_score_base']:.1f}; "
        f"FID {metrics['fid']:.2f} vs {metrics['fid_base']:.2f}; "
        f"forgetting {metrics['forgetting']:+.2f} -> {out}/report.html"
    )
    if e.push_to_hub:  # upstream's flag; what is pushed is the chosen checkpoint, once evaluated
        from ..apps.publish import push_to_hub

        push_to_hub(cfg)
