"""The benchmarks' own arithmetic (the measurements themselves are never asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_step_reports_the_median_round_or_the_first_failure():
    median_round = load("train_step").median_round
    rounds = [{"steps_per_s": v, "peak_rss_gb": m} for v, m in ((3.0, 1.0), (9.0, 2.0), (4.0, 3.0))]
    row = median_round(rounds)
    assert (row["steps_per_s"], row["peak_rss_gb"]) == (4.0, 3.0)
    assert row["steps_per_s_rounds"] == [3.0, 9.0, 4.0]
    assert median_round([rounds[0], {"error": "out of memory"}]) == {"error": "out of memory"}


def test_convergence_configurations_stack_levers_on_the_recipe_and_refuse_unknown_names():
    conv = load("convergence")
    recipe_train = {**conv.UPSTREAM, "timestep_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 1.0}
    recipe_train.update(snr_gamma=5.0, hint_init="random", mode_scale=1.29, flow_shift=None)
    out = conv.configurations(recipe_train, ["upstream", "recipe+empty_50+cosine"])
    assert out["upstream"] == conv.UPSTREAM
    stacked = out["recipe+empty_50+cosine"]
    assert (stacked["proportion_empty_prompts"], stacked["lr_scheduler"], stacked["hint_init"]) == (0.5, "cosine", "random")
    for bad in (["recipe+nope"], ["nope"], ["recipe+"]):
        with pytest.raises(SystemExit, match="unknown configuration"):
            conv.configurations(recipe_train, bad)


def test_convergence_upstream_is_the_familys_and_flow_levers_only_for_flow():
    from controlnet_recipe.models.families import FAMILIES

    conv = load("convergence")
    recipe_train = {**conv.UPSTREAM, "timestep_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 1.0}
    recipe_train.update(snr_gamma=5.0, mode_scale=1.29, flow_shift=None)
    flux = conv.configurations(recipe_train, None, FAMILIES["flux"].upstream_objective)
    assert flux["upstream"]["timestep_sampling"] == "logit_normal" and flux["upstream"]["logit_mean"] == 0.0
    assert "shift_3" in flux and "min_snr" not in flux and flux["shift_3"]["flow_shift"] == 3.0
    sd = conv.configurations(recipe_train, None, FAMILIES["sd"].upstream_objective)
    assert sd["upstream"] == conv.UPSTREAM and "min_snr" in sd and "shift_3" not in sd
    with pytest.raises(SystemExit, match="unknown configuration"):
        conv.configurations(recipe_train, ["recipe+min_snr"], FAMILIES["flux"].upstream_objective)


def test_convergence_mean_of_seeds_averages_each_probe_and_each_condition():
    mean_of = load("convergence").mean_of
    runs = [
        {
            "curve": [
                {"step": 0, "samples": 0, "seconds": 0.0, "miou": 0.1},
                {"step": 5, "samples": 40, "seconds": 2.0, "miou": 0.3},
            ],
            "last_scores": {"miou": [0.2, 0.4]},
        },
        {
            "curve": [
                {"step": 0, "samples": 0, "seconds": 0.0, "miou": 0.1},
                {"step": 5, "samples": 40, "seconds": 4.0, "miou": 0.5},
            ],
            "last_scores": {"miou": [0.4, float("nan")]},
        },
    ]
    out = mean_of(runs, {"ema_decay": None})
    assert [row["miou"] for row in out["curve"]] == pytest.approx([0.1, 0.4])
    assert out["curve"][1]["seconds"] == 3.0 and out["curve"][1]["samples"] == 40
    assert out["last_scores"]["miou"] == pytest.approx([0.3, 0.4])  # a condition one seed could not score: the others'
    assert len(out["seed_curves"]) == 2


def _kind(trainable: int, finals: list[float], curve: list[float]) -> dict:
    rows = [{"step": i * 10, "samples": i * 80, "seconds": 1.0 + i, "miou": v} for i, v in enumerate(curve)]
    return {
        "trainable": trainable,
        "saved_bytes": trainable * 4,
        "samples_per_second": 80.0 * trainable**-0.1,
        "curve": rows,
        "last_scores": {"miou": finals},
        "fid": 5.0,
        "seed_curves": [rows, rows],
        "seed_final": [rows[-1], rows[-1]],
        "planner": {"tier": "8gb", "peak_gib": 6.0, "trainable_full": trainable * 1000},
        "planner_nf4": {"tier": None, "peak_gib": 9.0, "trainable_full": trainable * 1000},
    }


def test_adapters_gain_share_light_kinds_and_samples_to_the_controlnets_final():
    bench = load("adapters")
    base = [0.1] * 8
    results = {
        "setup": "sd",
        "recipe": "demo",
        "seeds": [0, 1],
        "steps": 20,
        "batch_size": 8,
        "held_out": 8,
        "fidelity_key": "miou",
        "base": {"miou": 0.1},
        "base_scores": {"miou": base},
        "base_fid": 6.0,
        "kinds": {
            "controlnet": _kind(1000, [0.3] * 8, [0.1, 0.2, 0.3]),
            "light": _kind(90, [0.27] * 8, [0.1, 0.3, 0.27]),  # 9% of the parameters, 85% of the gain
            "weak": _kind(50, [0.15] * 8, [0.1, 0.12, 0.15]),  # 5%, 25%: never reaches the ControlNet's final
            "heavy": _kind(500, [0.3] * 8, [0.1, 0.25, 0.3]),  # 50%: not light
        },
    }
    bench.summarize(results, n_boot=200)
    s = {k: v["summary"] for k, v in results["kinds"].items()}
    assert s["light"]["gain"][0] == pytest.approx(0.17)
    assert s["light"]["gain_share"] == pytest.approx(0.85)
    assert s["light"]["trainable_share"] == pytest.approx(0.09)
    assert s["light"]["samples_to_controlnet_final"] == 80  # its first probe past step 0 at 0.3
    assert s["weak"]["samples_to_controlnet_final"] is None
    assert s["heavy"]["samples_to_controlnet_final"] == 160
    assert results["light_and_enough"] == ["light"]
    text = bench.table(results)
    assert "| `weak` |" in text and "never" in text and "8gb, 6.0 | none fits" in text
    assert "of its gain: light by the tiny models' parameters; light by the full-size base's." in text
    results["kinds"]["weak"]["planner"]["trainable_full"] = 1  # 0.0001% at full size, but 25% of the gain
    results["kinds"]["heavy"]["planner"]["trainable_full"] = 50_000  # 5% at full size, the whole gain
    results["kinds"].pop("light")
    bench.summarize(results, n_boot=200)
    verdict = "of its gain: none by the tiny models' parameters; heavy by the full-size base's."
    assert bench.table(results).rstrip().endswith(verdict)
