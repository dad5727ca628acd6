"""Shared fixtures: the repository root and a tiny copy of the recipe's params."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# The embedded default, shrunk so that the whole pipeline runs in about a minute.
TINY = {
    "data": {"num_train": 48, "num_validation": 8},
    "base": {"tiny": {"vae_steps": 3, "unet_steps": 3, "vae_batch_size": 4, "unet_batch_size": 4}},
    "evaluator": {"steps": 3, "batch_size": 4},
    "train": {"max_train_steps": 3, "batch_size": 4, "lr_warmup_steps": 1},
    "evaluate": {"num_samples": 4, "num_inference_steps": 2, "grid_rows": 2},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tiny_params() -> dict:
    p = repo_params()
    p[p["recipe"]] = merge(p[p["recipe"]], TINY)
    p["tiers"]["cpu"] = {**p["tiers"]["cpu"], "batch_size": 4}
    return p


@pytest.fixture
def params_file(tmp_path: Path):
    """Write a params dict to a file and return its path."""

    def write(params: dict, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    return write


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch):
    """Run in an empty folder (stages write their outputs relative to the working directory)."""
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    return tmp_path
