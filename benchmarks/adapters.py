"""Which control should I train? Every kind of control (``adapter.kind``) that runs on a setup's
family, trained on the same cached data for the same samples over several seeds, probed on the
same held-out conditions with the same sampling seeds and scored by the evaluate stage's scorer.

    python benchmarks/adapters.py --setup sd      # the embedded default: controlnet, controlnet_lora, t2i_adapter, controlnet_xs
    python benchmarks/adapters.py --setup flux    # demo-flux: controlnet, controlnet_lora, control_lora
    python benchmarks/adapters.py --setup sd --kinds controlnet t2i_adapter --seeds 0 --steps 100 --every 50

Each setup runs in a project of its own (``--work``, default ``tmp/bench-adapters-<setup>``: the
repository's src, dvc.yaml and params.yaml with the setup's recipe; the data stages' outputs
copied from this checkout where they are current), built with ``dvc repro cache evaluator``.
ControlNet-XS needs two resnets per UNet block, so the ``sd`` setup's tiny base has two for every
kind (``base.tiny.layers_per_block: 2``): its ControlNet is not the demo's.

Per kind: trained parameters (tiny, and at full size from the planner), the saved folder's size,
training samples/s against the ControlNet's in the same run, the planner's peak on the smallest
tier that fits at full size (``faces`` for sd, ``flux`` for flux: the recipes' full-size
counterparts), the fidelity gain over the base with its 95% interval (the seeds' mean per held-out
condition, paired with the base), the samples it took to reach the ControlNet's final fidelity,
and FID against the real held-out images. Writes benchmarks/results/adapters_<setup>.{json,md,png}
after each kind, so a stopped run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from convergence import first_reaching, mean_of, train_one  # noqa: E402

SETUPS = {  # setup -> its recipe, the recipe planned at full size, the tiny base's resnets per block
    "sd": {"recipe": "demo", "full_size": "faces", "layers_per_block": 2},
    "flux": {"recipe": "demo-flux", "full_size": "flux", "layers_per_block": None},
}
COPIED = ("data", "models/evaluator")  # outputs DVC keeps when their stage is unchanged (dvc.lock copied too)
OUT = ROOT / "benchmarks" / "results"
LIGHT = 0.10  # "light": at most this share of the ControlNet's trained parameters
ENOUGH = 0.80  # ... keeping at least this share of its gain
ENV = {  # the stages' `python` is this one; a commit for DVCLive to log against
    **os.environ,
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    "DVC_NO_ANALYTICS": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),  # this checkout's code
    **{f"GIT_{w}_{k}": v for w in ("AUTHOR", "COMMITTER") for k, v in (("NAME", "bench"), ("EMAIL", "bench@localhost"))},
}


def prepare(setup: str, work: Path, outputs_from: Path = ROOT) -> Path:
    """A project for ``setup`` in ``work`` with its cache and evaluator built (``dvc repro``
    reruns nothing where they are current: the data stages' outputs and dvc.lock are copied from
    ``outputs_from``, a project that ran them)."""
    s = SETUPS[setup]
    if not (work / ".dvc").is_dir():
        work.mkdir(parents=True, exist_ok=True)
        shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for f in ("dvc.yaml", "params.yaml", ".gitignore"):  # .gitignore: outputs stay out of the commit below
            shutil.copy(ROOT / f, work / f)
        if (outputs_from / "dvc.lock").is_file():
            shutil.copy(outputs_from / "dvc.lock", work / "dvc.lock")
        for d in COPIED:
            if (outputs_from / d).is_dir():
                shutil.copytree(outputs_from / d, work / d, symlinks=True, ignore=shutil.ignore_patterns("cache"))
        params = work / "params.yaml"
        params.write_text(re.sub(r"(?m)^recipe:\s*\S+", f"recipe: {s['recipe']}", params.read_text(), count=1))
        if s["layers_per_block"]:
            from controlnet_recipe.apps.check import set_block_value

            set_block_value(params, s["recipe"], "layers_per_block", str(s["layers_per_block"]))
        dvc = [sys.executable, "-m", "dvc"]
        for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "bench"]):
            subprocess.run(cmd, cwd=work, check=True, env=ENV)
    print(f"adapters: {setup}: dvc repro cache evaluator in {work}", flush=True)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "cache", "evaluator"], cwd=work, check=True, env=ENV)
    return work


def kinds_for(family: str) -> list[str]:
    from controlnet_recipe.adapters import KINDS, adapter

    return [k for k in KINDS if family in adapter(k).families]


def adapter_params(kind: str) -> dict:
    """A kind with its settings at their defaults (null)."""
    from controlnet_recipe.adapters.adapter import SETTINGS

    return {"kind": kind, **dict.fromkeys(SETTINGS)}


def smallest_fit(cfg, kind: str, quantize: str | None = None) -> dict:
    """The planner at full size (``cfg``: the full-size recipe's config): the smallest tier that
    fits ``kind`` (with the base quantised so, where given), its peak and the trained parameters."""
    from controlnet_recipe.planning.cli import tiers_for, with_overrides
    from controlnet_recipe.planning.plan import arch_family, architecture, plan_tier

    cfg = with_overrides(cfg, kind, quantize)
    arch = architecture(cfg.recipe.base.pretrained_model, cfg.recipe.base.family)
    names = [n for n in tiers_for(arch_family(arch), cfg.tiers) if cfg.tiers[n].memory_gb and not cfg.tiers[n].shard_frozen]
    last = None
    for name in sorted(names, key=lambda n: (cfg.tiers[n].memory_gb, cfg.tiers[n].deepspeed is not None)):  # plain first
        last = plan_tier(cfg.recipe, name, cfg.tiers[name], arch)
        if last.fits:
            break
    return {
        "tier": last.tier if last and last.fits else None,
        "peak_gib": round(max(last.peak_gib, last.validation_peak_gib), 2) if last else None,
        "trainable_full": last.trainable_params if last else None,
        "quantize": cfg.recipe.base.quantize,
    }


class Bench:
    """One setup's project, its held-out set and its scorer (run from inside the project)."""

    def __init__(self, samples: int):
        from controlnet_recipe.core.config import load_config
        from controlnet_recipe.core.storage import CAPTIONS_DIR, load_dataset_dir
        from controlnet_recipe.evaluation.sampling import Sampler
        from controlnet_recipe.evaluation.scorer import Scorer
        from controlnet_recipe.metrics.clip import to_uint8
        from controlnet_recipe.models.base_model import BaseRef, load_base

        self.cfg = load_config("params.yaml")
        r = self.cfg.recipe
        val = load_dataset_dir(CAPTIONS_DIR)["validation"]
        val = val.select(range(min(samples, len(val))))
        self.conditions = [c.convert("RGB") for c in val[r.columns.conditioning_image]]
        self.prompts = list(val[r.columns.caption])
        self.seeds = [r.evaluate.seed + i for i in range(len(val))]
        self.base = load_base(BaseRef.read())
        self.family = BaseRef.read().family
        self.scorer = Scorer(r)
        self.targets = self.scorer.condition.targets(val["landmarks"], self.conditions, r.data.resolution)
        self.real = to_uint8([im.convert("RGB") for im in val[r.columns.image]], r.data.resolution)
        self.features = self.scorer.clip.feature_module()
        base_images = Sampler(self.base, r.evaluate, r.data.resolution).generate(self.prompts, self.seeds, desc="base")
        self.base_scores = self.scorer.fidelity(base_images, self.conditions, self.targets)
        self.base_fid = self.fid(base_images)

    def fid(self, images) -> float:
        from controlnet_recipe.evaluation.quality import fid_kid
        from controlnet_recipe.metrics.clip import to_uint8

        r = self.cfg.recipe
        return fid_kid(self.real, to_uint8(images, r.data.resolution), self.features, r.evaluate.seed)["fid"]

    def ctx(self, kind: str) -> dict:
        from controlnet_recipe.adapters import adapter
        from controlnet_recipe.evaluation.sampling import Sampler

        r = self.cfg.recipe
        sampler = Sampler(self.base, r.evaluate, r.data.resolution, adapter(kind))
        return {"sampler": sampler, "scorer": self.scorer, "prompts": self.prompts, "seeds": self.seeds,
                "conditions": self.conditions, "targets": self.targets}  # fmt: skip


def run_kind(bench: Bench, kind: str, seeds: list[int], steps: int, every: int) -> dict:
    """``kind`` trained once per seed; its curve (the seeds' mean per probe), the final scores (the
    seeds' mean per held-out condition), FID of each seed's last images, its sizes and speed."""
    ctx, runs = bench.ctx(kind), []
    for s in seeds:
        t0 = time.time()
        runs.append(train_one(bench.cfg, f"{kind} seed {s}", {"seed": s}, steps, every, ctx, adapter_params(kind)))
        runs[-1]["fid"] = bench.fid(runs[-1].pop("last_images"))
        runs[-1]["wall_seconds"] = round(time.time() - t0, 1)
    mean = mean_of(runs, adapter_params(kind))
    fids = [r["fid"] for r in runs]
    return {
        "trainable": runs[0]["trainable"],
        "saved_bytes": runs[0]["saved_bytes"],
        "samples_per_second": float(np.mean([r["curve"][-1]["samples"] / r["curve"][-1]["seconds"] for r in runs])),
        "curve": mean["curve"],
        "last_scores": mean["last_scores"],
        "fid": float(np.mean(fids)),
        "fid_seeds": fids,
        "seed_curves": mean["seed_curves"],
        "seed_final": [r["curve"][-1] for r in runs],
    }


def summarize(results: dict, n_boot: int = 2000) -> None:
    """Each kind against the base and the ControlNet: gains with intervals, shares, samples to the
    ControlNet's final fidelity (in place, under each kind's ``summary``)."""
    from controlnet_recipe.evaluation.stats import paired_diff_ci

    fk, kinds = results["fidelity_key"], results["kinds"]
    base = np.array(results["base_scores"][fk])
    ref = kinds.get("controlnet")
    for k in kinds.values():
        gain = paired_diff_ci(np.array(k["last_scores"][fk]), base, n_boot)
        s = {"gain": list(gain), "seed_gains": [row[fk] - results["base"][fk] for row in k["seed_final"]]}
        if ref is not None:
            target = ref["curve"][-1][fk]
            s["gain_share"] = gain[0] / (target - results["base"][fk])
            s["trainable_share"] = k["trainable"] / ref["trainable"]
            s["speed_ratio"] = k["samples_per_second"] / ref["samples_per_second"]
            s["samples_to_controlnet_final"] = first_reaching(k["curve"], fk, target, True)
            if k.get("planner", {}).get("trainable_full") and ref.get("planner", {}).get("trainable_full"):
                s["trainable_share_full"] = k["planner"]["trainable_full"] / ref["planner"]["trainable_full"]
        k["summary"] = s
    for key, share in (("light_and_enough", "trainable_share"), ("light_and_enough_full", "trainable_share_full")):
        results[key] = [n for n, k in kinds.items() if n != "controlnet" and k["summary"].get(share, 1) <= LIGHT
                        and k["summary"].get("gain_share", 0) >= ENOUGH]  # fmt: skip


def table(results: dict) -> str:
    fk, total = results["fidelity_key"], results["steps"] * results["batch_size"]
    lines = [
        f"| kind | trained (tiny) | trained (full size) | saved | samples/s vs ControlNet | smallest tier, peak GiB "
        f"| same, nf4 base | {fk} gain over the base [95% CI] | share of the ControlNet's gain "
        f"| samples to the ControlNet's final | FID |",
        "|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|",
    ]

    def tier(p: dict) -> str:
        return f"{p['tier']}, {p['peak_gib']:.1f}" if p.get("tier") else "none fits"

    for name, k in results["kinds"].items():
        s, p = k["summary"], k.get("planner", {})
        g = s["gain"]
        full = f"{p['trainable_full'] / 1e6:.1f}M ({s.get('trainable_share_full', 1):.0%})" if p.get("trainable_full") else "-"
        reached = s.get("samples_to_controlnet_final")
        reached = "never" if reached is None else f"{reached:,} ({reached / total:.0%})"
        lines.append(
            f"| `{name}` | {k['trainable']:,} ({s.get('trainable_share', 1):.0%}) | {full} | {k['saved_bytes'] / 1e6:.2f} MB "
            f"| {s.get('speed_ratio', 1):.2f} | {tier(p)} | {tier(k.get('planner_nf4', {}))} "
            f"| {g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}] "
            f"| {s.get('gain_share', 1):.0%} | {reached} | {k['fid']:.2f} |"
        )
    lines.append(
        f"| base alone | | | | | | | | | | {results['base_fid']:.2f} |\n\n"
        f"{results['setup']} ({results['recipe']}): {len(results['seeds'])} seeds, {results['steps']} steps of "
        f"{results['batch_size']} ({total:,} samples), {results['held_out']} held-out conditions; base {fk} "
        f"{results['base'][fk]:.3f}. Light (at most {LIGHT:.0%} of the ControlNet's trained parameters) and keeping at "
        f"least {ENOUGH:.0%} of its gain: {', '.join(results['light_and_enough']) or 'none'} by the tiny models' "
        f"parameters; {', '.join(results.get('light_and_enough_full', [])) or 'none'} by the full-size base's."
    )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fk = results["fidelity_key"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, k in results["kinds"].items():
        xs = [row["samples"] for row in k["curve"]]
        seeds = np.array([[row[fk] for row in c] for c in k["seed_curves"]])
        line = ax.plot(xs, seeds.mean(0), marker=".", label=name, lw=2.5 if name == "controlnet" else 1.5)[0]
        ax.fill_between(xs, seeds.min(0), seeds.max(0), color=line.get_color(), alpha=0.15)
        s = k["summary"]
        g = s["gain"]
        bx.errorbar([k["trainable"]], [g[0]], yerr=[[g[0] - g[1]], [g[2] - g[0]]], fmt="o", color=line.get_color(), capsize=4)
        bx.annotate(name, (k["trainable"], g[0]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(results["base"][fk], color="grey", ls="--", lw=1, label="base alone")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel(f"{fk} (higher is better); band: min..max over seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    bx.set_xscale("log")
    bx.axhline(0, color="grey", ls="--", lw=1)
    bx.set_xlabel("trained parameters (tiny model, log)")
    bx.set_ylabel(f"final {fk} gain over the base, 95% CI")
    bx.grid(alpha=0.3)
    fig.suptitle(f"Which control? {results['setup']} ({results['recipe']}), {len(results['seeds'])} seeds, "
                 f"{results['steps'] * results['batch_size']:,} samples each")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"adapters_{results['setup']}"
    if "controlnet" in results["kinds"]:
        summarize(results)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    if "controlnet" in results["kinds"]:
        stem.with_suffix(".md").write_text(table(results) + "\n")
        plot(results, stem.with_suffix(".png"))


def run(args) -> dict:
    from controlnet_recipe.core.config import load_config

    if args.report_only:  # the table and plot again from the saved JSON
        results = json.loads((args.out / f"adapters_{args.setup}.json").read_text())
        save(results, args.out)
        return results

    work = prepare(args.setup, (args.work or ROOT / "tmp" / f"bench-adapters-{args.setup}").resolve(), args.outputs_from)
    os.chdir(work)
    bench = Bench(args.samples)
    r = bench.cfg.recipe
    kinds = args.kinds or kinds_for(bench.family)
    if kinds[0] != "controlnet":
        kinds = ["controlnet", *[k for k in kinds if k != "controlnet"]]  # the reference comes first
    full = load_config(work / "params.yaml", {"recipe": SETUPS[args.setup]["full_size"], "gpu": "auto"})
    results = {
        "setup": args.setup,
        "recipe": bench.cfg.recipe_name,
        "seeds": args.seeds,
        "steps": args.steps or r.train.max_train_steps,
        "batch_size": r.train.batch_size,
        "held_out": len(bench.prompts),
        "fidelity_key": bench.scorer.fidelity_key,
        "base": {k: float(np.nanmean(v)) for k, v in bench.base_scores.items()},
        "base_scores": {k: v.tolist() for k, v in bench.base_scores.items()},
        "base_fid": bench.base_fid,
        "kinds": {},
    }
    for kind in kinds:
        results["kinds"][kind] = run_kind(bench, kind, args.seeds, results["steps"], args.every)
        results["kinds"][kind]["planner"] = smallest_fit(full, kind)
        results["kinds"][kind]["planner_nf4"] = smallest_fit(full, kind, "nf4")
        save(results, args.out)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", choices=SETUPS, default="sd")
    ap.add_argument("--kinds", nargs="+", default=None, help="default: every kind that runs on the setup's family")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's)")
    ap.add_argument("--every", type=int, default=250, help="probe every this many steps")
    ap.add_argument("--samples", type=int, default=64, help="held-out conditions per probe")
    ap.add_argument("--work", type=Path, default=None, help="the setup's project (default: tmp/bench-adapters-<setup>)")
    ap.add_argument("--outputs-from", type=Path, default=ROOT, help="a project whose data stages ran (default: this one)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report-only", action="store_true", help="the table and plot again from --out's JSON, nothing run")
    args = ap.parse_args()
    results = run(args)
    print("\n" + table(results))
    print(f"-> {args.out}/adapters_{args.setup}.{{json,md,png}}")


if __name__ == "__main__":
    main()
