"""The DeepSpeed tier (ZeRO-2) on two CPU processes, launched as the train stage launches it on two
GPUs: every rank saves its part of each checkpoint, the checkpoints are consolidated so that the
sweep sees them, and a run resumes from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from controlnet_recipe.core.config import Tier
from controlnet_recipe.evaluation.sweep import candidates, load_controlnet
from controlnet_recipe.training.checkpoints import WEIGHTS
from controlnet_recipe.training.launch import launch_command

from .conftest import run

pytest.importorskip("deepspeed")

TIER = "8gb-zero2"
FINAL = "models/adapter"


def _params(project: Path, dest: Path, steps: int) -> dict:
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["gpu"] = TIER
    # fp32 and no checkpointing: what a CPU runs; the ZeRO-2 config (sharded optimizer, offload) is the tier's own
    p["tiers"][TIER].update(batch_size=2, mixed_precision="no", gradient_checkpointing=False)
    t = p["demo"]["train"]
    t.update(max_train_steps=steps, batch_size=4, checkpointing_steps=2, checkpoints_total_limit=3)
    t["validation"].update(steps=10_000, held_out=1, num_images=1)
    (dest / "zero.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return p


def _train(work: Path, params: dict) -> str:
    tier = Tier.model_validate(params["tiers"][TIER])
    cmd = launch_command(tier, 2, ["train", "--params", "zero.yaml"], {})  # as on a machine with two GPUs
    return run(cmd, work)


@pytest.mark.slow
@pytest.mark.xdist_group("two_ranks")  # accelerate's port 29500: one such test at a time under make test-slow's -n 2
def test_zero2_checkpoints_are_saved_by_every_rank_swept_and_resumed(project: Path, tmp_path: Path):
    work = tmp_path / "zero"
    shutil.copytree(project, work, symlinks=True)
    for leftover in ("train", FINAL):
        shutil.rmtree(work / leftover, ignore_errors=True)

    params = _params(project, work, steps=6)
    _train(work, params)
    rel = json.loads((work / FINAL / "training.json").read_text())["checkpoints"]  # this run's folder
    root = work / rel
    for step in (2, 4, 6):
        ckpt = root / f"checkpoint-{step}"
        shards = sorted(p.name for p in (ckpt / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))
        assert len(shards) == 2, f"{ckpt}: expected one optimizer shard per rank, got {shards}"
        assert (ckpt / "random_states_1.pkl").is_file(), "the second rank did not save its RNG state"
        assert (ckpt / WEIGHTS).is_file(), "the ZeRO shards were not consolidated"
    # The sweep sees every checkpoint; the last one's consolidated weights are the exported model.
    found = candidates(root, work / FINAL, 6)
    assert [(c.step, c.path.name) for c in found] == [(2, "checkpoint-2"), (4, "checkpoint-4"), (6, "checkpoint-6")]
    final = load_file(work / FINAL / "diffusion_pytorch_model.safetensors")
    swept = load_controlnet(found[-1], work / FINAL).state_dict()
    assert final.keys() == swept.keys()
    assert all(torch.equal(final[k], swept[k]) for k in final)
    early = load_controlnet(found[0], work / FINAL).state_dict()
    assert any(not torch.equal(early[k], swept[k]) for k in final), "the checkpoints hold the same weights"

    # Lose the last checkpoint and the model: the rerun resumes from step 4, on both ranks, exactly.
    shutil.rmtree(root / "checkpoint-6")
    shutil.rmtree(work / FINAL)
    assert f"resuming from {rel}/checkpoint-4" in _train(work, params)
    resumed = load_file(work / FINAL / "diffusion_pytorch_model.safetensors")
    diffs = {k: (resumed[k] - final[k]).abs().max().item() for k in final}
    assert all(torch.equal(resumed[k], final[k]) for k in final), f"largest difference {max(diffs.values())}"
