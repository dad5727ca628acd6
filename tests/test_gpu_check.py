"""The prepared GPU check runs end to end on the CPU (--dry-run: tiny sizes, no CUDA), so it is
known to work before a GPU is lent; its predictions file matches the configurations it runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


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
    # the transformer families' tiers through the recipe's own step (and flux-24gb's validation), in order
    transformer = [(r["family"], r["tier"], r["mode"]) for r in rows if r["kind"] == "transformer" and "adapter" not in r]
    assert transformer == _gpu_check().TRANSFORMER_ROWS
    kinds = [(r["family"], r["tier"], r["adapter"], r["quantize"]) for r in rows if "adapter" in r]
    assert kinds == _gpu_check().ADAPTER_ROWS  # the other kinds of control, on a quantised base where it says
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    for r in rows:
        if not deepspeed and r["kind"] == "transformer" and r["tier"] == "flux-24gb":
            assert "DeepSpeed is not importable" in r["skipped"], r
            continue
        assert "error" not in r and "skipped" not in r, (r["tier"], r["mode"], r.get("error") or r.get("skipped"))
        assert r["samples_per_s"] > 0 and r["predicted_allocated_gib"] > 0
    if deepspeed:  # ZeRO-2 through accelerate, as the trainer runs flux-24gb; its validation on that state
        flux_24gb = [r for r in rows if r["kind"] == "transformer" and r["tier"] == "flux-24gb"]
        assert [r["deepspeed"] for r in flux_24gb] == [True, True]
        assert flux_24gb[1]["validation_images"] == 4
    assert all(r["loss"] > 0 for r in rows if r["kind"] == "transformer" and r["mode"] != "validation")
    assert "recipe / upstream step" in p.stdout


def test_the_device_predictions_cover_the_device_configurations():
    gpu_check = _gpu_check()
    known = json.loads(gpu_check.PLAN_FILE.read_text())
    assert {gpu_check.key(c) for c in gpu_check.configs(dry=False)} == set(known)


def test_flux_24gb_rows_run_first_among_the_transformer_rows():
    """`--only transformers` on the device: flux-24gb's step, then its validation on that step's
    training state, before the other tiers (the time budget may cut the last ones)."""
    gpu_check = _gpu_check()
    rows = [c for c in gpu_check.configs(dry=False) if c["kind"] == "transformer"]
    assert [(c["tier"], c["mode"]) for c in rows[:2]] == [("flux-24gb", "recipe"), ("flux-24gb", "validation")]
    assert {(c["arch"], c["resolution"]) for c in rows} == {("flux1-dev", 512), ("sd35-medium", 1024)}
    assert {c["tier"] for c in rows} == {"flux-16gb", "flux-24gb", "flux-40gb", "flux-80gb", "sd3-24gb", "sd3-80gb"}
