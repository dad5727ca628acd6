"""The SDXL family end to end on CPU at a very small size: `dvc repro` with a recipe block whose
base is a tiny SDXL-architecture base (two text encoders, pooled embeddings, time ids), exact
resume, evaluate, generate, and a plain diffusers client loading the trained ControlNet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controlnet_recipe.apps.publish import model_card
from controlnet_recipe.core.config import load_config
from controlnet_recipe.core.storage import load_dataset_dir
from controlnet_recipe.models import tiny
from controlnet_recipe.models.base_model import BaseRef

from .conftest import SDXL_RECIPE, _env, run
from .test_resume import assert_kill_and_resume_is_exact

WEIGHTS = "models/adapter/diffusion_pytorch_model.safetensors"
RES = 64

# A client that knows nothing of this project: only diffusers, as the model card tells users.
CLIENT = """
import sys
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from PIL import Image

base, model, condition = sys.argv[1:4]
controlnet = ControlNetModel.from_pretrained(model)
pipe = StableDiffusionXLControlNetPipeline.from_pretrained(base, controlnet=controlnet)
image = pipe(
    "a photography of a face", image=Image.open(condition), num_inference_steps=2, height=64, width=64,
    generator=torch.Generator().manual_seed(0),
).images[0]
assert not [m for m in sys.modules if m.startswith("controlnet_recipe")]
print("client:", type(controlnet.add_embedding).__name__, image.size)
"""


@pytest.mark.slow
def test_sdxl_stages_through_dvc(sdxl_project: Path):
    work = sdxl_project
    ref = json.loads((work / "models/base/base.json").read_text())
    assert ref["family"] == "sdxl"
    index = json.loads((work / "models/base/pipeline/model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index
    # The cache holds what SDXL needs: both encoders' features, the pooled embedding, the time ids.
    meta = json.loads((work / "data/cache/cache.json").read_text())
    rows = load_dataset_dir(work / "data/cache" / meta["fingerprint"])["train"].with_format("torch")[:4]
    assert rows["text_embedding"].shape[1:] == (tiny.MAX_TOKENS, tiny.TEXT_DIM + tiny.TEXT_DIM_2)
    assert rows["pooled_embedding"].shape[1:] == (tiny.POOLED_DIM,)
    assert rows["time_ids"][0].tolist() == [RES, RES, 0, 0, RES, RES]  # the synthetic faces are rendered at 64 px
    config = json.loads((work / "models/adapter/config.json").read_text())
    assert config["addition_embed_type"] == "text_time" and config["cross_attention_dim"] == tiny.TEXT_DIM + tiny.TEXT_DIM_2
    metrics = json.loads((work / "eval/metrics.json").read_text())
    assert {"fidelity", "fidelity_base", "beats_base"} <= metrics.keys()
    assert (work / "models/best/diffusion_pytorch_model.safetensors").is_file()  # the sweep chose a checkpoint
    card = model_card(load_config(work / "params.yaml"), BaseRef.read(work / "models/base"), metrics)
    assert "StableDiffusionXLControlNetPipeline.from_pretrained" in card and "stable-diffusion-xl" in card
    assert "Stage 'train' didn't change" in run([sys.executable, "-m", "dvc", "repro", "train"], work)


@pytest.mark.slow
def test_a_plain_diffusers_client_loads_and_generates(sdxl_project: Path, tmp_path: Path):
    cond = load_dataset_dir(sdxl_project / "data/captions")["validation"][0]["conditioning_image"]
    cond.save(tmp_path / "condition.png")
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    out = subprocess.run(
        [sys.executable, str(script), "models/base/pipeline", "models/adapter", str(tmp_path / "condition.png")],
        cwd=sdxl_project,
        env={**_env(), "PYTHONPATH": ""},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "client: TimestepEmbedding (64, 64)" in out.stdout


@pytest.mark.slow
def test_generate_cli_with_sdxl(sdxl_project: Path, tmp_path: Path):
    cond = load_dataset_dir(sdxl_project / "data/captions")["validation"][0]["conditioning_image"]
    cond.save(tmp_path / "condition.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "controlnet_recipe", "generate", "--condition", str(tmp_path / "condition.png")]
    run([*cmd, "--prompt", "a photography of a face", "--num-images", "2", "--out", str(out)], sdxl_project)
    assert sorted(p.name for p in out.glob("image-*.png")) == ["image-00.png", "image-01.png"]


@pytest.mark.slow
def test_sdxl_kill_and_resume_is_bitwise_exact(sdxl_project: Path, tmp_path: Path):
    assert_kill_and_resume_is_exact(sdxl_project, tmp_path, SDXL_RECIPE)


@pytest.mark.slow
def test_an_sd_tier_stops_an_sdxl_run_in_one_line(sdxl_project: Path, tmp_path: Path):
    """With ``family: auto`` only the base stage knows the family: the train stage checks the tier
    against base.json before it loads any model."""
    p = yaml.safe_load((sdxl_project / "params.yaml").read_text())
    p[SDXL_RECIPE]["base"]["family"] = "auto"
    p["gpu"] = "16gb"
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(p, sort_keys=False))  # the project stays as built
    out = subprocess.run(
        [sys.executable, "-m", "controlnet_recipe", "train", "--params", str(tmp_path / "auto.yaml")],
        cwd=sdxl_project, env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: models/base/base.json (family sdxl): gpu: tier '16gb' is sized for family sd; "
        "a base of family sdxl needs one of sdxl-24gb, sdxl-40gb, sdxl-80gb"
    )
