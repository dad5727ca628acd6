"""Convergence benchmark: how soon does each training objective give a ControlNet that follows its
condition? From one data/base/evaluator (the pipeline's own: run `dvc repro cache evaluator`
first), each configuration trains the train stage's ControlNet for the same number of samples,
and every ``--every`` steps its weights (the EMA's, where it keeps one) draw the same held-out
conditions with the same seeds; the evaluate stage's scorer measures redrawn mIoU and landmark NME.

    python benchmarks/convergence.py                        # every configuration, the recipe's steps
    python benchmarks/convergence.py --configs upstream recipe --steps 600 --every 100
    python benchmarks/convergence.py --configs upstream recipe recipe+empty_50 --seeds 0 1 2

Configurations: ``upstream`` (uniform timesteps, plain MSE, no EMA, one learning rate, a constant
schedule), each lever alone on top of it, ``recipe`` (params.yaml's train block, the chosen
combination) and ``recipe+<lever>[+<lever>...]``. With several ``--seeds`` each configuration
trains once per seed and its curve is their mean. Prints a table and a summary line; writes
benchmarks/results/convergence.{json,png} (after each configuration, so a stopped run keeps them).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

UPSTREAM = {  # upstream's objective (SD's; a family's own replaces the objective's keys, below);
    # proportion_empty_prompts: the embedded default's until this benchmark
    "timestep_sampling": "uniform",
    "loss_weighting": "none",
    "ema_decay": None,
    "new_layers_lr_multiplier": 1.0,
    "hint_init": "zero",
    "proportion_empty_prompts": 0.1,
    "condition_loss_weight": 1.0,
    "lr_scheduler": "constant",
}
LEVERS = {  # each alone, on top of upstream's objective
    "cubic": {"timestep_sampling": "cubic"},
    "logit_normal": {"timestep_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 1.0},
    "min_snr": {"loss_weighting": "min_snr", "snr_gamma": 5.0},
    "ema": {"ema_decay": 0.99},
    "lr_x5": {"new_layers_lr_multiplier": 5.0},
    "empty_50": {"proportion_empty_prompts": 0.5},  # the ControlNet paper drops half the prompts
    "hint_random": {"hint_init": "random"},
    "condition_x3": {"condition_loss_weight": 3.0},  # the face parts' latent pixels count 3x in the MSE
    "beta2_0.99": {"adam_beta2": 0.99},  # Adam's second moment over ~100 steps, not ~1,000: adapts sooner
    "logit_m1": {"timestep_sampling": "logit_normal", "logit_mean": 1.0, "logit_std": 1.0},  # noisier steps still
    "cosine": {"lr_scheduler": "cosine"},  # the learning rate decays to 0 over the run, after the warm-up
    "linear": {"lr_scheduler": "linear"},
    # flow matching only (SD3, Flux)
    "mode": {"timestep_sampling": "mode", "mode_scale": 1.29},  # SD3's "mode" density: mostly mid-noise steps
    "shift_3": {"flow_shift": 3.0},  # SD3's shift at 1024 px: most steps at high noise
    "cosmap": {"loss_weighting": "cosmap"},
    "logit_m05": {"timestep_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 1.0},  # flow: slightly noisier steps
    "shift_6": {"flow_shift": 6.0},  # noisier still
    "embed_copy": {"hint_init": "copy"},  # the condition embedder starts as the base's latent embedder
    "single_2": {"controlnet_single_layers": 2},  # Flux: the tiny base's 2 single-stream blocks copied too
    "empty_0": {"proportion_empty_prompts": 0.0},  # no caption dropout
}
FLOW_ONLY = ("mode", "shift_3", "cosmap", "shift_6", "embed_copy", "single_2")
DDPM_ONLY = ("min_snr", "cubic")
OUT = ROOT / "benchmarks" / "results"
STYLES = {"recipe": {"lw": 2.5, "color": "black"}, "upstream": {"lw": 2.5, "color": "black", "ls": "--"}}


def configurations(recipe_train: dict, names: list[str] | None, upstream_objective: dict | None = None) -> dict[str, dict]:
    """name -> the train block's lever settings. ``upstream_objective``: the base family's
    upstream values of the objective's levers (``Family.upstream_objective``): a flow-matching
    family's upstream draws logit-normal timesteps, and its lever set drops the DDPM-only ones."""
    upstream = {**UPSTREAM, **(upstream_objective or {})}
    flow = upstream["timestep_sampling"] != "uniform"
    levers = {k: v for k, v in LEVERS.items() if k not in (DDPM_ONLY if flow else FLOW_ONLY)}
    out = {"upstream": upstream, **{k: {**upstream, **v} for k, v in levers.items()}}
    keys = (*upstream, "logit_mean", "logit_std", "snr_gamma", "mode_scale", "flow_shift")
    out["recipe"] = {k: recipe_train[k] for k in dict.fromkeys(keys)}
    for name in names or []:  # "recipe+<lever>[+<lever>...]": levers on top of the recipe's combination
        first, *added = name.split("+")
        if first == "recipe" and added and all(a in levers for a in added):
            out[name] = {**out["recipe"], **{k: v for a in added for k, v in levers[a].items()}}
    unknown = [n for n in names or [] if n not in out]
    if unknown:
        raise SystemExit(f"convergence: unknown configuration(s) {unknown}: see --help")
    return {k: v for k, v in out.items() if names is None or k in names}


def first_reaching(curve: list[dict], key: str, target: float, higher: bool) -> int | None:
    """Samples seen at the first probe whose ``key`` is at least as good as ``target``."""
    for row in curve:
        if row["step"] == 0:  # the untrained ControlNet (zero convolutions: the base alone)
            continue
        if (row[key] >= target) if higher else (row[key] <= target):
            return row["samples"]
    return None


def run(args) -> dict:
    from controlnet_recipe.core.config import load_config
    from controlnet_recipe.core.storage import CAPTIONS_DIR, load_dataset_dir
    from controlnet_recipe.evaluation.sampling import Sampler
    from controlnet_recipe.evaluation.scorer import Scorer
    from controlnet_recipe.models.base_model import BaseRef, load_base

    cfg = load_config(ROOT / "params.yaml")
    r = cfg.recipe
    steps = args.steps or r.train.max_train_steps
    from controlnet_recipe.models.families import family

    upstream_objective = family(BaseRef.read().family).upstream_objective
    configs = configurations(r.train.model_dump(), args.configs, upstream_objective)  # unknown names stop here
    val = load_dataset_dir(CAPTIONS_DIR)["validation"]
    n = min(args.samples, len(val))
    val = val.select(range(n))
    cols = r.columns
    conditions = [c.convert("RGB") for c in val[cols.conditioning_image]]
    prompts = list(val[cols.caption])
    seeds = [r.evaluate.seed + i for i in range(n)]
    sampler = Sampler(load_base(BaseRef.read()), r.evaluate, r.data.resolution)
    scorer = Scorer(r)
    targets = scorer.condition.targets(val["landmarks"], conditions, r.data.resolution)
    fk = scorer.fidelity_key
    base_scores = scorer.fidelity(sampler.generate(prompts, seeds, desc="base"), conditions, targets)
    results = {
        "steps": steps,
        "batch_size": r.train.batch_size,
        "held_out": n,
        "fidelity_key": fk,
        "base": {k: float(np.nanmean(v)) for k, v in base_scores.items()},
        "configs": {},
    }
    ctx = {
        "sampler": sampler,
        "scorer": scorer,
        "prompts": prompts,
        "seeds": seeds,
        "conditions": conditions,
        "targets": targets,
    }
    if len(args.seeds) > 1:
        results["seeds"] = args.seeds
    for name, levers in configs.items():
        several = len(args.seeds) > 1
        runs = [
            train_one(cfg, f"{name} seed {s}" if several else name, {**levers, "seed": s}, steps, args.every, ctx)
            for s in args.seeds
        ]
        results["configs"][name] = runs[0] if len(runs) == 1 else mean_of(runs, levers)
        save(results, args.out)  # each finished configuration survives a later crash or Ctrl-C
    return results


def mean_of(runs: list[dict], levers: dict) -> dict:
    """Several seeds of one configuration as one: each probe's scores averaged over the seeds, and
    each held-out condition's final score averaged over them (the paired interval's unit)."""
    curve = []
    for rows in zip(*(run["curve"] for run in runs)):
        row = {"step": rows[0]["step"], "samples": rows[0]["samples"]}
        row.update({k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in row})
        curve.append(row)
    keys = runs[0]["last_scores"]
    last = {k: np.nanmean([run["last_scores"][k] for run in runs], axis=0).tolist() for k in keys}
    return {"levers": levers, "curve": curve, "last_scores": last, "seed_curves": [run["curve"] for run in runs]}


def train_one(cfg, name: str, levers: dict, steps: int, every: int, ctx: dict, adapter: dict | None = None) -> dict:
    """Train one configuration (``name``: its label in the progress lines) for ``steps`` steps,
    probing its fidelity every ``every`` steps. ``adapter``: the recipe's adapter params replaced
    (another kind of control); then the result also holds the trained parameters, the saved
    folder's bytes and (under ``last_images``, not JSON) the last probe's images."""
    import torch

    from controlnet_recipe.core.config import AdapterCfg, TrainCfg
    from controlnet_recipe.models.base_model import BaseRef
    from controlnet_recipe.stages.train import tier_for
    from controlnet_recipe.training.trainer import Trainer

    r = cfg.recipe
    t = TrainCfg.model_validate(
        {
            **r.train.model_dump(),
            **levers,
            "max_train_steps": steps,
            "num_train_epochs": None,
            "checkpointing_steps": steps,
            "checkpoints_total_limit": 1,
            "resume_from_checkpoint": None,
            "report_to": [],
            "validation": {**r.train.validation.model_dump(), "steps": steps},
        }
    )
    update = {"train": t} if adapter is None else {"train": t, "adapter": AdapterCfg.model_validate(adapter)}
    run_cfg = cfg.model_copy(update={"recipe": r.model_copy(update=update)})
    curve, clock, out = [], {"probes": 0.0, "t0": 0.0}, {"levers": levers}
    fk = ctx["scorer"].fidelity_key

    def probe(step: int, controlnet) -> None:
        p0 = time.time()
        if not curve:  # the first call comes before the first step: the clock starts here
            clock["t0"] = p0
        model = copy.deepcopy(controlnet).eval()  # the sampler casts it (fp16 on CUDA): never the trained one
        imgs = ctx["sampler"].generate(ctx["prompts"], ctx["seeds"], model, ctx["conditions"], desc=f"{name} {step}")
        scores = ctx["scorer"].fidelity(imgs, ctx["conditions"], ctx["targets"])
        row = {"step": step, "samples": step * t.batch_size, "seconds": round(p0 - clock["t0"] - clock["probes"], 1)}
        row.update({k: float(np.nanmean(v)) for k, v in scores.items()})
        curve.append(row)
        out["last_scores"] = {k: v.tolist() for k, v in scores.items()}
        out["last_images"] = imgs
        clock["probes"] += time.time() - p0
        print(f"convergence: {name} step {step}: {fk} {row[fk]:.3f}, nme {row['nme']:.3f}, {row['seconds']} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(t.seed)
        trainer = Trainer(run_cfg, *tier_for(run_cfg, BaseRef.read()), train_dir=Path(tmp) / "train")
        with trainer.weights() as model:  # before the first step
            probe(trainer.step, model)
        while trainer.step < trainer.max_steps:  # the probe runs between the trainer's runs, not in its loop
            trainer.run(until=trainer.step + every)
            if trainer.step % every == 0:
                with trainer.weights() as model:
                    probe(trainer.step, model)
        with trainer.weights() as model:
            out["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trainer.finish(Path(tmp) / "model")
        out["saved_bytes"] = sum(f.stat().st_size for f in (Path(tmp) / "model").rglob("*") if f.is_file())
    out["curve"] = curve
    if adapter is None:
        del out["last_images"]
    return out


def summarize(results: dict, reference: str, candidate: str, n_boot: int = 2000) -> dict:
    from controlnet_recipe.evaluation.stats import paired_diff_ci

    fk = results["fidelity_key"]
    ref, cand = results["configs"][reference], results["configs"][candidate]
    total = ref["curve"][-1]["samples"]
    out = {}
    for key, higher in ((fk, True), ("nme", False)):
        target = ref["curve"][-1][key]
        reached = first_reaching(cand["curve"], key, target, higher)
        a, b = np.array(cand["last_scores"][key]), np.array(ref["last_scores"][key])
        gain = paired_diff_ci(a, b, n_boot) if higher else paired_diff_ci(b, a, n_boot)  # positive: better
        out[key] = {
            "reference_final": target,
            "candidate_final": cand["curve"][-1][key],
            "samples_to_reference_final": reached,
            "samples_ratio": None if reached is None else reached / total,
            "gain": gain,
        }
    return out


def save(results: dict, out: Path) -> None:
    """The results so far, as JSON and as the plot."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "convergence.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "convergence.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fk = results["fidelity_key"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for name, c in results["configs"].items():
        xs = [row["samples"] for row in c["curve"]]
        ts = [row["seconds"] for row in c["curve"]]
        style = STYLES.get(name, {"lw": 1})
        for col, key in enumerate((fk, "nme")):
            ys = [row[key] for row in c["curve"]]
            axes[0, col].plot(xs, ys, label=name, marker=".", **style)
            axes[1, col].plot(ts, ys, label=name, marker=".", **style)
    for col, key in enumerate((fk, "nme")):
        for row_i, xlabel in enumerate(("samples seen", "training seconds (probes excluded)")):
            ax = axes[row_i, col]
            ax.axhline(results["base"][key], color="grey", ls="--", lw=1, label="base alone" if row_i == col == 0 else None)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{key} ({'higher' if key == fk else 'lower'} is better)")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Time to control: {results['held_out']} held-out conditions, batch {results['batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--configs", nargs="+", default=None, help="of: upstream recipe " + " ".join(LEVERS) + " recipe+<lever>[+<lever>...]"
    )
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per configuration (default: the recipe's)")
    ap.add_argument("--every", type=int, default=100, help="probe every this many steps")
    ap.add_argument("--samples", type=int, default=32, help="held-out conditions per probe")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds per configuration; several: curves averaged"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    results = run(args)
    fk = results["fidelity_key"]
    print(f"\n{'config':<14} {'samples':>8} {'seconds':>8} {fk:>7} {'nme':>7}")
    for name, c in results["configs"].items():
        last = c["curve"][-1]
        print(f"{name:<14} {last['samples']:>8} {last['seconds']:>8.0f} {last[fk]:>7.3f} {last['nme']:>7.3f}")
    print(f"{'base alone':<14} {'':>8} {'':>8} {results['base'][fk]:>7.3f} {results['base']['nme']:>7.3f}")
    if "upstream" in results["configs"]:  # every other configuration against upstream's objective
        results["summaries"] = {n: summarize(results, "upstream", n) for n in results["configs"] if n != "upstream"}
        if "recipe" in results["summaries"]:
            results["summary"] = results["summaries"]["recipe"]
        for name, s in results["summaries"].items():
            for key, v in s.items():
                ratio = "never" if v["samples_ratio"] is None else f"{v['samples_ratio']:.2f}x"
                g = v["gain"]
                print(
                    f"summary {key}: {name} reaches upstream's final {key} ({v['reference_final']:.3f}) in {ratio} its samples; "
                    f"final {v['candidate_final']:.3f} vs {v['reference_final']:.3f}, "
                    f"gain {g[0]:+.3f} [95% CI {g[1]:+.3f}, {g[2]:+.3f}]"
                )
    save(results, args.out)
    print(f"-> {args.out / 'convergence.json'}, {args.out / 'convergence.png'}")


if __name__ == "__main__":
    main()
