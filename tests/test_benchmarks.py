"""The benchmarks' own arithmetic (the measurements themselves are never asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_reports_the_median_round_or_the_first_failure():
    median_round = load("train_step").median_round
    rounds = [{"steps_per_s": v, "peak_rss_gb": m} for v, m in ((3.0, 1.0), (9.0, 2.0), (4.0, 3.0))]
    row = median_round(rounds)
    assert (row["steps_per_s"], row["peak_rss_gb"]) == (4.0, 3.0)
    assert row["steps_per_s_rounds"] == [3.0, 9.0, 4.0]
    assert median_round([rounds[0], {"error": "out of memory"}]) == {"error": "out of memory"}
