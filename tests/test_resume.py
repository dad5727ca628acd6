"""Kill training with SIGKILL at random moments, during checkpoint saves too, and resume: the final
ControlNet must equal, bit for bit, the one of an uninterrupted run with the same seed. A longer
run extends a shorter one; a run with settings that change what its checkpoints mean starts beside
the earlier run and never touches its checkpoints."""

from __future__ import annotations

import json
import os
import random
import re
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

from controlnet_recipe.adapters import adapter
from controlnet_recipe.evaluation.sweep import candidates
from controlnet_recipe.training.checkpoints import (
    STATE,
    Checkpointer,
    clean_partial,
    damage,
    find_resume,
    list_checkpoints,
    run_dir,
    run_key,
    save_checkpoint,
)

from .conftest import _env, run

STEPS = 16
WEIGHTS = "models/adapter/diffusion_pytorch_model.safetensors"


def _copy(project: Path, dest: Path, resume: str | None) -> Path:
    shutil.copytree(project, dest, symlinks=True)
    for leftover in ("train", "models/adapter"):
        shutil.rmtree(dest / leftover, ignore_errors=True)
    p = yaml.safe_load((project / "params.yaml").read_text())
    t = p["demo"]["train"]
    t.update(max_train_steps=STEPS, checkpointing_steps=2, checkpoints_total_limit=2, resume_from_checkpoint=resume)
    t["validation"].update(steps=10_000, held_out=1, num_images=1)
    p["tiers"]["cpu"]["batch_size"] = 2  # micro-batch 2 x accumulation 2: resume mid-accumulation must not happen
    (dest / "resume.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return dest


def _run_folder(work: Path) -> Path:
    """The one run's checkpoint folder (train/checkpoints/run-<key>), or the root before there is one."""
    return next((work / "train/checkpoints").glob("run-*"), work / "train/checkpoints")


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
            names = [p.name for p in root.glob("run-*/*")]
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


def assert_kill_and_resume_is_exact(project: Path, tmp_path: Path, recipe: str, adapter_kind: str | None = None) -> None:
    """A family's project (SDXL, SD3, Flux), or a kind of control (``adapter_kind``): 12 steps
    uninterrupted, then the same run SIGKILLed once after a checkpoint, resumed: bit for bit the
    same weights (what a family or a kind saves and restores; a kill during a save is the
    checkpointer's, whatever the kind: test_sigkill_and_resume_is_bitwise_exact lands those)."""

    def copy(dest: Path, resume: str | None) -> Path:
        shutil.copytree(project, dest, symlinks=True)
        for leftover in ("train", "models/adapter"):
            shutil.rmtree(dest / leftover, ignore_errors=True)
        p = yaml.safe_load((project / "params.yaml").read_text())
        t = p[recipe]["train"]
        t.update(max_train_steps=12, checkpointing_steps=2, checkpoints_total_limit=2, resume_from_checkpoint=resume)
        t["validation"].update(steps=10_000, held_out=1, num_images=1)
        p["tiers"]["cpu"]["batch_size"] = 2
        if adapter_kind:
            p[recipe]["adapter"]["kind"] = adapter_kind
        (dest / "resume.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        return dest

    ref = copy(tmp_path / "ref", None)
    run(_train_cmd(), ref)
    kind = adapter(adapter_kind or yaml.safe_load((ref / "resume.yaml").read_text())[recipe]["adapter"]["kind"])
    weights = f"models/adapter/{next(f for f in kind.files if f.endswith('.safetensors'))}"  # what the kind saves
    expected = load_file(ref / weights)
    work = copy(tmp_path / "killed", "latest")
    rng = random.Random(0)
    assert _kill_when(work, False, 0, rng), "the run finished before it could be killed"
    assert "resuming from" in run(_train_cmd(), work)
    got = load_file(work / weights)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_exact(project: Path, tmp_path: Path):
    ref = _copy(project, tmp_path / "ref", resume=None)
    run(_train_cmd(), ref)
    expected = load_file(ref / WEIGHTS)

    work = _copy(project, tmp_path / "killed", resume="latest")
    rng = random.Random(int(os.environ.get("RESUME_TEST_SEED", "0")))
    kills, kills_during_save = 0, 0
    for during_save in (True, False, True, False):
        last = max((int(p.name.split("-")[1]) for p in list_checkpoints(_run_folder(work))), default=0)
        if _kill_when(work, during_save, last, rng):
            kills += 1
            leftovers = [p for p in _run_folder(work).iterdir() if p.name.startswith(".checkpoint-")]
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
    assert re.search(f"resuming from train/checkpoints/run-[0-9a-f]+/checkpoint-{STEPS}", run(_train_cmd(), work))
    assert (work / "train/validation.png").is_file()
    assert all(torch.equal(v, expected[k]) for k, v in load_file(work / WEIGHTS).items())


def test_interrupted_save_is_never_resumed(tmp_path: Path):
    root = tmp_path / "ckpt"
    mine = run_dir(root, "k")

    def write(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"x" * 10)

    for step in (2, 4, 6):
        save_checkpoint(mine, step, write, {"run": "k", "settings": {}}, keep=2)
    assert [p.name for p in list_checkpoints(mine)] == ["checkpoint-4", "checkpoint-6"]
    # What a kill leaves: a half-written temp folder, and a renamed folder without its state file.
    (mine / ".checkpoint-8.tmp").mkdir()
    (mine / "checkpoint-10").mkdir()
    path, _ = find_resume(root, "latest", "k", {})
    assert path == mine / "checkpoint-6"
    assert sorted(clean_partial(mine)) == [".checkpoint-8.tmp", "checkpoint-10"]
    assert (mine / "checkpoint-6" / STATE).is_file()


def test_resume_names_the_setting_and_keeps_the_other_runs_checkpoints(tmp_path: Path):
    root = tmp_path / "ckpt"
    old = {"optimizer": "AdamW", "learning_rate": 1e-5}
    new = {"optimizer": "AdamW8bit", "learning_rate": 1e-5}
    save_checkpoint(run_dir(root, "run-a"), 2, lambda f: None, {"run": "run-a", "settings": old}, keep=1)
    path, why = find_resume(root, "latest", "run-b", new)
    assert path is None
    assert "optimizer: 'AdamW' -> 'AdamW8bit'" in why and "kept" in why and "learning_rate" not in why
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: .*optimizer: 'AdamW' -> 'AdamW8bit'"):
        find_resume(root, str(run_dir(root, "run-a") / "checkpoint-2"), "run-b", new)
    # the new run's pruning never reaches the old run's folder
    for step in (2, 4, 6):
        save_checkpoint(run_dir(root, "run-b"), step, lambda f: None, {"run": "run-b", "settings": new}, keep=1)
    assert [p.name for p in list_checkpoints(run_dir(root, "run-a"))] == ["checkpoint-2"]
    assert find_resume(root, None, "run-a", old)[0] is None


def test_a_shorter_run_resumes_within_its_length_and_keeps_the_longer_runs_checkpoints(tmp_path: Path):
    root = tmp_path / "ckpt"
    key = run_key({})
    mine = run_dir(root, key)
    for step in (375, 750):
        save_checkpoint(mine, step, lambda f: None, {"run": key, "settings": {}}, keep=None)
    path, why = find_resume(root, "latest", key, {}, last=650)
    assert path == mine / "checkpoint-375" and "checkpoint-750: past this run's 650 steps, kept" in why
    assert find_resume(root, "latest", key, {}, last=750)[0] == mine / "checkpoint-750"
    path, why = find_resume(root, "latest", key, {}, last=300)
    assert path is None and why.startswith("no checkpoint of this run within its 300 steps: starting fresh")
    with pytest.raises(ValueError, match=r"checkpoint-750 is at step 750, past this run's 650 steps"):
        find_resume(root, str(mine / "checkpoint-750"), key, {}, last=650)
    assert [p.name for p in list_checkpoints(mine)] == ["checkpoint-375", "checkpoint-750"]
    for c in list_checkpoints(mine):
        (c / "model.safetensors").touch()
    # the sweep of the shorter run's model: its own steps, never the longer run's 750
    assert [c.step for c in candidates(mine, tmp_path / "final", 650)] == [375, 650]
    Checkpointer(root, {}, 325, None).clear(650)  # a fresh start of the shorter run
    assert [p.name for p in list_checkpoints(mine)] == ["checkpoint-750"]


def _params(work: Path, **train) -> None:
    p = yaml.safe_load((work / "resume.yaml").read_text())
    p["demo"]["train"].update(train)
    (work / "resume.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_longer_run_extends_the_shorter_one_bitwise(project: Path, tmp_path: Path):
    """max_train_steps raised from 4 to 8 (constant schedule): the rerun resumes at step 4 and ends
    on the weights of a run that asked for 8 from the start."""
    ref = _copy(project, tmp_path / "ref", resume="latest")
    _params(ref, max_train_steps=8, checkpoints_total_limit=None)
    run(_train_cmd(), ref)
    work = _copy(project, tmp_path / "work", resume="latest")
    _params(work, max_train_steps=4, checkpoints_total_limit=None)
    run(_train_cmd(), work)
    first = _files(_run_folder(work))
    _params(work, max_train_steps=8)
    out = run(_train_cmd(), work)
    assert re.search(r"resuming from train/checkpoints/run-[0-9a-f]+/checkpoint-4", out)
    assert json.loads((work / "models/adapter/training.json").read_text())["resumed_from_step"] == 4
    after = _files(_run_folder(work))
    assert all(after[k] == v for k, v in first.items()), "the shorter run's checkpoints were rewritten"
    expected, got = load_file(ref / WEIGHTS), load_file(work / WEIGHTS)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_another_optimizer_starts_a_new_run_and_keeps_the_old_one(project: Path, tmp_path: Path):
    work = _copy(project, tmp_path / "work", resume="latest")
    _params(work, max_train_steps=4)
    run(_train_cmd(), work)
    old_folder = _run_folder(work)
    before = _files(old_folder)
    p = yaml.safe_load((work / "resume.yaml").read_text())
    p["tiers"]["cpu"]["use_8bit_adam"] = True  # the optimizer's kind: its state means something else
    (work / "resume.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = run(_train_cmd(), work)
    said = [line for line in out.splitlines() if "is another run's" in line]
    assert len(said) == 1 and "optimizer: 'AdamW' -> 'AdamW8bit'" in said[0] and "kept" in said[0]
    assert _files(old_folder) == before, "the earlier run's checkpoints were touched"
    assert len(list((work / "train/checkpoints").glob("run-*"))) == 2
    # naming the old run's checkpoint explicitly stops in one line
    _params(work, resume_from_checkpoint=str(old_folder.relative_to(work) / "checkpoint-4"))
    proc = subprocess.run(_train_cmd(), cwd=work, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "optimizer: 'AdamW' -> 'AdamW8bit'" in errors[0]


def test_a_damaged_checkpoint_is_found_by_what_it_recorded_and_by_its_format(tmp_path: Path):
    from safetensors.torch import save_file

    mine = run_dir(tmp_path, "k")

    def write(folder: Path) -> None:
        save_file({"w": torch.arange(1000.0)}, str(folder / "model.safetensors"))
        torch.save({"state": torch.ones(100)}, folder / "optimizer.bin")

    for step in (2, 4):
        save_checkpoint(mine, step, write, {"run": "k", "settings": {}}, keep=None)
    good, bad = mine / "checkpoint-2", mine / "checkpoint-4"
    assert damage(good) is None and damage(bad) is None
    weights = bad / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-100])  # what a bad copy leaves
    assert damage(bad) == f"model.safetensors: {size - 100} bytes, {size} when saved"
    read_json_state = json.loads((bad / STATE).read_text())
    read_json_state.pop("files")  # a checkpoint from before sizes were recorded: its format tells
    (bad / STATE).write_text(json.dumps(read_json_state))
    assert damage(bad) == f"model.safetensors: {size - 100} bytes where its header needs {size}"
    path, why = find_resume(tmp_path, "latest", "k", {})
    assert path == good
    assert (
        why == f"{bad}/model.safetensors: {size - 100} bytes where its header needs {size}: cannot be read; resuming from {good}"
    )
    optimizer = good / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-10])
    assert "optimizer.bin" in damage(good)
    with pytest.raises(
        ValueError, match=r"^train: no checkpoint of this run can be read \(.*checkpoint-4/model.*checkpoint-2/optimizer"
    ):
        find_resume(tmp_path, "latest", "k", {})
    assert (bad / "model.safetensors").is_file() and (good / "optimizer.bin").is_file()  # nothing deleted


@pytest.mark.slow
def test_resume_goes_back_past_a_damaged_checkpoint_to_the_same_weights(project: Path, tmp_path: Path):
    work = _copy(project, tmp_path / "work", "latest")
    p = yaml.safe_load((work / "resume.yaml").read_text())
    p["demo"]["train"].update(max_train_steps=4, checkpoints_total_limit=None)
    (work / "resume.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    run(_train_cmd(), work)
    expected = load_file(work / WEIGHTS)
    latest = _run_folder(work) / "checkpoint-4"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = run(_train_cmd(), work)
    line = next(line for line in out.splitlines() if "cannot be read" in line)
    print(line)  # the line it prints, for the record
    assert re.fullmatch(
        r"train: \S+/checkpoint-4/model.safetensors: \d+ bytes, \d+ when saved: cannot be read; resuming from \S+/checkpoint-2",
        line,
    )
    assert (latest.with_name("checkpoint-4.damaged") / "model.safetensors").is_file()  # kept for a person to look at
    assert all(torch.equal(v, expected[k]) for k, v in load_file(work / WEIGHTS).items())
    # Every checkpoint damaged: one line, exit 2, nothing deleted.
    for checkpoint in list_checkpoints(_run_folder(work)):
        (checkpoint / "model.safetensors").write_bytes(b"")
    before = sorted(p.relative_to(work) for p in (work / "train/checkpoints").rglob("*"))
    proc = subprocess.run(_train_cmd(), cwd=work, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"^error: train: no checkpoint of this run can be read \(.*\); nothing was deleted$", proc.stderr, re.M)
    assert sorted(p.relative_to(work) for p in (work / "train/checkpoints").rglob("*")) == before
