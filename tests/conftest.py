"""Shared fixtures: the repository root and a tiny copy of the recipe's params."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# transformers binds its log handler to sys.stderr on first use; bind it now, to the session's
# stream, not to a test's capsys stream that is closed by the time a later test logs a warning.
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.get_logger("transformers")

WORDS = ["a", "photography", "of", "face", "woman", "man", "with", "red", "blue", "hair", "smiling", "on", "the", "background"]
PROMPT = "a photography of"


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    """A tiny BLIP captioner built from configs and saved with save_pretrained (no download)."""
    from transformers import AutoTokenizer

    from controlnet_recipe.models.captioner import BLIP_SPECIAL_TOKENS, save_random_blip

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    path = save_random_blip(
        tmp_path_factory.mktemp("tiny-blip"),
        WORDS,
        text=dict(encoder_hidden_size=32, max_position_embeddings=32, **small),
        vision=dict(image_size=32, patch_size=8, **small),
        max_length=32,
    )
    vocab = BLIP_SPECIAL_TOKENS + WORDS
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer(PROMPT).input_ids == [vocab.index(t) for t in ["[CLS]", *PROMPT.split(), "[SEP]"]]
    return path


# The embedded default, shrunk so that the whole pipeline runs in about a minute.
TINY = {
    "data": {"num_train": 48, "num_validation": 8},
    "base": {"tiny": {"vae_steps": 3, "unet_steps": 3, "vae_batch_size": 4, "unet_batch_size": 4}},
    "evaluator": {"steps": 3, "batch_size": 4, "landmark_steps": 3, "clip_steps": 3},
    "cache": {"batch_size": 16, "shard_size": 20},
    "train": {
        "max_train_steps": 3,
        "batch_size": 4,
        "lr_warmup_steps": 1,
        "checkpointing_steps": 2,
        "validation": {"steps": 2, "held_out": 2, "num_images": 1, "num_inference_steps": 2},
    },
    "evaluate": {
        "num_samples": 4,
        "num_inference_steps": 2,
        "grid_rows": 2,
        "probe_conditions": 1,
        "sweep": {"num_samples": 2, "tolerance": 0.05, "max_forgetting": 0.25},
        "bootstrap": 100,
    },
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


def _env(**extra: str) -> dict:
    env = {**os.environ, **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    for k, v in (("NAME", "test"), ("EMAIL", "test@example.com")):
        env.setdefault(f"GIT_AUTHOR_{k}", v)
        env.setdefault(f"GIT_COMMITTER_{k}", v)
    return env


def run(args: list[str], cwd: Path, **env: str) -> str:
    p = subprocess.run(args, cwd=cwd, env=_env(**env), capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def dvc(*args: str, cwd: Path, **env: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd, **env)


def imports_dir(project: Path) -> Path:
    """Where :func:`make_project`'s stages recorded, per stage, the package files they imported."""
    return project.with_name(project.name + ".imports")


@pytest.fixture
def own_project(project: Path, tmp_path: Path) -> Path:
    """A copy of the built project for a test that changes it: the shared one stays as built, so
    no test depends on which ran before it."""
    return Path(shutil.copytree(project, tmp_path / "own", symlinks=True))


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """A copy of the project (code, dvc.yaml) with tiny params, in its own git + DVC repo, after
    one `dvc repro` of the whole pipeline."""
    return make_project(tmp_path_factory.mktemp("project"), tiny_params())


SDXL_RECIPE = "demo-sdxl"


def sdxl_params() -> dict:
    """The tiny params with a recipe block whose base is the tiny SDXL-architecture base."""
    p = tiny_params()
    p[SDXL_RECIPE] = merge(p["demo"], {"base": {"family": "sdxl"}})
    p["recipe"] = SDXL_RECIPE
    return p


@pytest.fixture(scope="session")
def sdxl_project(tmp_path_factory) -> Path:
    """:func:`project` through the SDXL family: the same stages on a tiny SDXL base."""
    return make_project(tmp_path_factory.mktemp("sdxl-project"), sdxl_params())


def family_params(family: str) -> dict:
    """The tiny params with params.yaml's ``demo-<family>`` recipe block (the demo on that family's
    tiny base) shrunk as :data:`TINY`."""
    p = repo_params()
    p[f"demo-{family}"] = merge(p[f"demo-{family}"], TINY)
    p["tiers"]["cpu"] = {**p["tiers"]["cpu"], "batch_size": 4}
    p["recipe"] = f"demo-{family}"
    return p


@pytest.fixture(scope="session", params=["sd3", "flux"])
def transformer_project(request, tmp_path_factory) -> Path:
    """:func:`project` through a transformer family (flow matching, the condition as latents):
    the same stages on a tiny SD3 or Flux base."""
    return make_project(tmp_path_factory.mktemp(f"{request.param}-project"), family_params(request.param))


def make_project(work: Path, params: dict) -> Path:
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], work)
    dvc("init", "-q", cwd=work)
    # A project is a clone with history; DVCLive needs at least one commit to log against.
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-q", "-m", "init"], work)
    dvc("repro", cwd=work, CONTROLNET_RECIPE_RECORD_IMPORTS=str(imports_dir(work)))
    return work
