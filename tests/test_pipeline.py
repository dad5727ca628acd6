"""The whole recipe at a very small size, through DVC exactly as `make demo` runs it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from .conftest import dvc, run, tiny_params


@pytest.mark.slow
def test_pipeline_outputs(project: Path):
    from diffusers import ControlNetModel

    from controlnet_recipe.core.storage import load_dataset_dir

    metrics = json.loads((project / "eval/metrics.json").read_text())
    for key in ("miou", "miou_base", "miou_ceiling", "concept_survival", "concept_survival_base", "face_rate_probes"):
        assert 0.0 <= metrics[key] <= 1.0
    for key in ("nme", "nme_base", "nme_ceiling", "fid", "fid_base", "kid", "clip_score", "clip_score_base"):
        assert metrics[key] is None or np.isfinite(metrics[key]), key
    assert metrics["fidelity_metric"] == "miou"  # the face map redrawn from re-detected landmarks
    summary = json.loads((project / "eval/summary.json").read_text())
    assert summary["fidelity"]["map_type"] == "categorical" and "extractor_miou" in summary["controlnet"]
    assert metrics["fidelity_gain_low"] <= metrics["fidelity_gain"] <= metrics["fidelity_gain_high"]
    # The sweep: checkpoints at steps 2 and the final model at step 3; the chosen one is exported.
    sweep = (project / "eval/sweep.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in sweep[1:]] == ["2", "3"]
    chosen = json.loads((project / "models/best/chosen.json").read_text())
    assert chosen["step"] == metrics["chosen_step"] in (2, 3)
    ControlNetModel.from_pretrained(project / "models/best")
    report = (project / "eval/report.html").read_text()
    for part in ("grid.png", "sweep.png", "probes.png", "Forgetting probes", "FID"):
        assert part in report
    n = tiny_params()["demo"]["evaluate"]["num_samples"]
    assert len(list((project / "eval/images/controlnet").glob("*.png"))) == n
    assert (project / "eval/grid.png").stat().st_size > 0
    assert (project / "models/base/samples.png").is_file()
    ds = load_dataset_dir(project / "data/captions")
    assert {"image", "conditioning_image", "caption"} <= set(ds["train"].column_names)
    assert ds["train"].features["conditioning_image"].__class__.__name__ == "Image"
    assert len(ds["validation"]) == tiny_params()["demo"]["data"]["num_validation"]
    cn = ControlNetModel.from_pretrained(project / "models/adapter")
    assert sum(p.numel() for p in cn.parameters()) > 0
    shown = dvc("metrics", "show", cwd=project)
    assert "miou_base" in shown and "concept_survival" in shown
    assert (project / "train/live/plots/metrics/loss.tsv").is_file()
    assert (project / "train/live/plots/metrics/val/fidelity.tsv").is_file()  # validation scored during training
    assert (project / "train/validation.png").is_file()


@pytest.mark.slow
def test_second_repro_does_nothing(project: Path):
    assert "up to date" in dvc("status", cwd=project)
    out = dvc("repro", cwd=project)
    assert "Running stage" not in out


@pytest.mark.slow
def test_caption_param_reruns_only_downstream(own_project: Path):
    project = own_project
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["demo"]["captions"]["prefix"] = "photo, "
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc("status", cwd=project)
    assert "captions:" in status and "data:" not in status and "conditions:" not in status
    assert "Running stage 'captions'" in dvc("repro", "--dry", cwd=project)
    out = dvc("repro", cwd=project)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"captions", "base", "cache", "evaluator", "train", "evaluate"}
    assert "Stage 'data' didn't change" in out and "Stage 'conditions' didn't change" in out


@pytest.mark.slow
def test_memory_tier_settings_train_for_real(own_project: Path):
    """A GPU tier's switches (micro-batch 1 + accumulation, gradient checkpointing, 8-bit AdamW,
    bf16 autocast, keeping zeroed grads) run through the same train stage; on CPU here."""
    project = own_project
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tiers"]["cpu"] = {
        "family": None,
        "memory_gb": None,
        "batch_size": 1,
        "gradient_checkpointing": True,
        "use_8bit_adam": True,
        "set_grads_to_none": False,
        "mixed_precision": "bf16",
        "attention": "sdpa",
        "deepspeed": None,
        "channels_last": True,
        "compile": False,
        "frozen_fp8": False,
    }
    params["demo"]["train"]["max_train_steps"] = 2
    (project / "tier.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([sys.executable, "-m", "controlnet_recipe", "train", "--params", "tier.yaml"], project)
    summary = json.loads((project / "models/adapter/training.json").read_text())
    assert summary["micro_batch"] == 1
    assert summary["gradient_accumulation_steps"] == params["demo"]["train"]["batch_size"]
    assert summary["effective_batch"] == params["demo"]["train"]["batch_size"]


@pytest.mark.slow
def test_ema_weights_are_checkpointed_swept_and_exported(project: Path, tmp_path: Path):
    """With train.ema_decay set, each checkpoint holds the EMA weights beside the trained ones; the
    sweep loads the EMA's and the exported ControlNet is the EMA's."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from controlnet_recipe.evaluation.sweep import Candidate, load_controlnet

    project = shutil.copytree(project, tmp_path / "ema", symlinks=True)
    for leftover in ("train", "models/adapter"):
        shutil.rmtree(project / leftover, ignore_errors=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    t = params["demo"]["train"]
    t.update(max_train_steps=3, checkpointing_steps=3, ema_decay=0.9, resume_from_checkpoint=None)
    (project / "ema.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([sys.executable, "-m", "controlnet_recipe", "train", "--params", "ema.yaml"], project)
    ckpt = project / json.loads((project / "models/adapter/training.json").read_text())["checkpoints"] / "checkpoint-3"
    ema, trained = load_file(ckpt / "ema.safetensors"), load_file(ckpt / "model.safetensors")
    assert ema.keys() == trained.keys()
    assert any(not torch.equal(ema[k], trained[k]) for k in ema)
    exported = load_file(project / "models/adapter/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    swept = load_controlnet(Candidate(3, ckpt), project / "models/adapter").state_dict()
    assert all(torch.equal(swept[k], ema[k]) for k in ema)
    assert json.loads((project / "models/adapter/training.json").read_text())["levers"]["ema_decay"] == 0.9


def _lock_outs(project: Path) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for s in lock.values() for o in s.get("outs", [])}


def test_rerun_from_scratch_is_byte_identical(own_project: Path):
    """Data stages give the same bytes and the tiny base the same weights when made again from
    nothing (their folders deleted, so no finished shard is reused)."""
    project = own_project
    outs = ("data/source", "data/photoreal", "data/conditions", "data/captions", "models/base")
    before = _lock_outs(project)
    for out in outs:
        shutil.rmtree(project / out)
    dvc("repro", "--force", "base", cwd=project)
    after = _lock_outs(project)
    assert {o: after[o] for o in outs} == {o: before[o] for o in outs}


@pytest.mark.slow
def test_sampled_images_do_not_depend_on_the_batch(project: Path, monkeypatch):
    """Image i comes from seeds[i] whatever else is in its batch, up to float rounding (oneDNN picks
    its kernels by batch size and CPU: a few pixels may differ by a level or two): so the evaluate
    stage reuses the sweep's images of the chosen checkpoint when the sweep drew every held-out
    condition."""
    from controlnet_recipe.core.config import load_config
    from controlnet_recipe.evaluation.sampling import Sampler
    from controlnet_recipe.evaluation.sweep import Candidate, load_controlnet
    from controlnet_recipe.models.base_model import BaseRef, load_base

    monkeypatch.chdir(project)
    cfg = load_config(project / "params.yaml")
    sampler = Sampler(load_base(BaseRef.read()), cfg.recipe.evaluate, cfg.recipe.data.resolution)
    cn = load_controlnet(Candidate(3, project / "models/adapter"), project / "models/adapter")
    cond = [Image.new("RGB", (32, 32), c) for c in ((0, 0, 0), (255, 128, 0), (40, 200, 90))]
    prompts, seeds = ["a face", "a smiling face", "a face on a blue background"], [5, 6, 7]
    three = sampler.generate(prompts, seeds, cn, cond)
    two = sampler.generate(prompts[1:], seeds[1:], cn, cond[1:])
    for a, b in zip(three[1:], two, strict=True):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= 2 and (diff > 0).mean() < 1e-2
    # A different seed is a different image: the comparison above can fail.
    other = sampler.generate(prompts[1:2], [99], cn, cond[1:2])[0]
    assert np.abs(np.asarray(other, dtype=np.int16) - np.asarray(two[0], dtype=np.int16)).max() > 1


@pytest.mark.slow
def test_cache_resumes_at_its_missing_shard(project: Path, tmp_path: Path, monkeypatch):
    """The cache is a sharded dataset like the data stages': a rerun after an interruption encodes
    only the shards that never finished, and the cache reads back the same."""
    import torch

    from controlnet_recipe.core.config import load_config
    from controlnet_recipe.stages.cache import build_cache
    from controlnet_recipe.training.latent_cache import SPLIT, LatentCache

    monkeypatch.chdir(project)
    cfg = load_config(project / "params.yaml")
    root = tmp_path / "cache"
    meta = build_cache(cfg, root)
    shards = sorted((root / meta["fingerprint"] / SPLIT).iterdir())
    assert len(shards) == meta["shards"] == 3  # 48 samples in shards of 20
    first = LatentCache.load(meta["fingerprint"], root).rows[:]
    kept = [next(s.glob("*.arrow")).stat().st_mtime_ns for s in shards[:2]]
    shutil.rmtree(shards[2])  # the run was killed while encoding the last shard
    build_cache(cfg, root)
    assert [next(s.glob("*.arrow")).stat().st_mtime_ns for s in shards[:2]] == kept  # not encoded again
    again = LatentCache.load(meta["fingerprint"], root).rows[:]
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
