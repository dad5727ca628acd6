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
