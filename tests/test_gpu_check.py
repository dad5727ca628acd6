"""The prepared GPU check runs end to end on the CPU (--dry-run: tiny sizes, no CUDA), so it is
known to work before a GPU is lent; its predictions file matches the configurations it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_measures_every_configuration(tmp_path):
    p = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())["rows"]
    assert {r["mode"] for r in rows} >= {"per-step encoding", "recipe", "upstream README_flux"}
    for r in rows:
        assert "error" not in r and "skipped" not in r, r
        assert r["samples_per_s"] > 0 and r["predicted_allocated_gib"] > 0
    assert "recipe / upstream step" in p.stdout


def test_the_device_predictions_cover_the_device_configurations():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    known = json.loads(gpu_check.PLAN_FILE.read_text())
    assert {gpu_check.key(c) for c in gpu_check.configs(dry=False)} == set(known)
