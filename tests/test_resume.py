"""Kill training with SIGKILL at random moments, during checkpoint saves too, and resume: the final
ControlNet must equal, bit for bit, the one of an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from controlnet_recipe.training.checkpoints import STATE, clean_partial, find_resume, list_checkpoints, save_checkpoint

from .conftest import _env, run

STEPS = 16
WEIGHTS = "models/controlnet/diffusion_pytorch_model.safetensors"


def _copy(project: Path, dest: Path, resume: str | None) -> Path:
    shutil.copytree(project, dest, symlinks=True)
    for leftover in ("train", "models/controlnet"):
        shutil.rmtree(dest / leftover, ignore_errors=True)
    p = yaml.safe_load((project / "params.yaml").read_text())
    t = p["demo"]["train"]
    t.update(max_train_steps=STEPS, checkpointing_steps=2, checkpoints_total_limit=2, resume_from_checkpoint=resume)
    t["validation"].update(steps=10_000, held_out=1, num_images=1)
    p["tiers"]["cpu"]["batch_size"] = 2  # micro-batch 2 x accumulation 2: resume mid-accumulation must not happen
    (dest / "resume.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return dest


def _train_cmd() -> list[str]:
    return [sys.executable, "-m", "controlnet_recipe", "train", "--params", "resume.yaml"]


def _kill_when(work: Path, during_save: bool, after_step: int, rng: random.Random, timeout: float = 120) -> bool:
    """Start training and SIGKILL it during a checkpoint save (a ``.checkpoint-*.tmp`` folder
    exists) or at a random moment once a checkpoint past ``after_step`` exists. False if the run
    finished first."""
    proc = subprocess.Popen(_train_cmd(), cwd=work, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = work / "train/checkpoints"
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            names = [p.name for p in root.iterdir()] if root.is_dir() else []
            if during_save and any(n.startswith(".checkpoint-") for n in names):
                proc.send_signal(signal.SIGKILL)
                break
            done = [int(n.split("-")[1]) for n in names if n.startswith("checkpoint-")]
            if not during_save and done and max(done) > after_step:
                time.sleep(rng.uniform(0.0, 0.3))
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.wait()
    return proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_exact(project: Path, tmp_path: Path):
    ref = _copy(project, tmp_path / "ref", resume=None)
    run(_train_cmd(), ref)
    expected = load_file(ref / WEIGHTS)

    work = _copy(project, tmp_path / "killed", resume="latest")
    rng = random.Random(int(os.environ.get("RESUME_TEST_SEED", "0")))
    kills, kills_during_save = 0, 0
    for during_save in (True, False, True, False):
        last = max((int(p.name.split("-")[1]) for p in list_checkpoints(work / "train/checkpoints")), default=0)
        if _kill_when(work, during_save, last, rng):
            kills += 1
            leftovers = [p for p in (work / "train/checkpoints").iterdir() if p.name.startswith(".checkpoint-")]
            kills_during_save += bool(leftovers)
    assert kills >= 3, "the runs finished before they could be killed"
    assert kills_during_save >= 1, "no kill landed during a checkpoint save"
    out = run(_train_cmd(), work)
    assert "resuming from" in out
    got = load_file(work / WEIGHTS)
    assert got.keys() == expected.keys()
    diffs = {k: (got[k] - expected[k]).abs().max().item() for k in got}
    assert all(torch.equal(got[k], expected[k]) for k in got), f"largest difference {max(diffs.values())}"
    # Run again after the end (DVC reruns train when its code changes): it resumes at the last step,
    # trains nothing, and still writes every output.
    (work / "train/validation.png").unlink()
    assert f"resuming from train/checkpoints/checkpoint-{STEPS}" in run(_train_cmd(), work)
    assert (work / "train/validation.png").is_file()
    assert all(torch.equal(v, expected[k]) for k, v in load_file(work / WEIGHTS).items())


def test_interrupted_save_is_never_resumed(tmp_path: Path):
    root = tmp_path / "ckpt"

    def write(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"x" * 10)

    for step in (2, 4, 6):
        save_checkpoint(root, step, write, {"fingerprint": "f"}, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-4", "checkpoint-6"]
    # What a kill leaves: a half-written temp folder, and a renamed folder without its state file.
    (root / ".checkpoint-8.tmp").mkdir()
    (root / "checkpoint-10").mkdir()
    path, _ = find_resume(root, "latest", "f")
    assert path == root / "checkpoint-6"
    assert sorted(clean_partial(root)) == [".checkpoint-8.tmp", "checkpoint-10"]
    assert (root / "checkpoint-6" / STATE).is_file()


def test_resume_refuses_another_runs_checkpoint(tmp_path: Path):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 2, lambda f: None, {"fingerprint": "run-a"}, keep=None)
    path, why = find_resume(root, "latest", "run-b")
    assert path is None and "other data or settings" in why
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        find_resume(root, str(root / "checkpoint-2"), "run-b")
    assert find_resume(root, None, "run-a")[0] is None
