"""The transformer families (SD3, Flux) end to end on CPU at a very small size: `dvc repro` with a
recipe block whose base is a tiny SD3 or Flux (T5 among the text encoders, flow matching, the
condition as VAE latents), exact resume, evaluate, generate, a plain diffusers client loading the
trained ControlNet, and a Flux folder that the recipe did not build."""

from __future__ import annotations

import json
import shutil
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

from .conftest import _env, run
from .test_resume import assert_kill_and_resume_is_exact

WEIGHTS = "models/adapter/diffusion_pytorch_model.safetensors"
RES = 64
CLASSES = {  # family: (ControlNet, its pipeline, the base's pipeline)
    "sd3": ("SD3ControlNetModel", "StableDiffusion3ControlNetPipeline", "StableDiffusion3Pipeline"),
    "flux": ("FluxControlNetModel", "FluxControlNetPipeline", "FluxPipeline"),
}

# A client that knows nothing of this project: only diffusers, as the model card tells users.
CLIENT = """
import sys
import torch
import diffusers
from PIL import Image

controlnet_class, pipeline_class, base, model, condition = sys.argv[1:6]
controlnet = getattr(diffusers, controlnet_class).from_pretrained(model)
pipe = getattr(diffusers, pipeline_class).from_pretrained(base, controlnet=controlnet)
image = pipe(
    "a photography of a face", control_image=Image.open(condition), num_inference_steps=2, height=64, width=64,
    max_sequence_length=32, generator=torch.Generator().manual_seed(0),
).images[0]
assert not [m for m in sys.modules if m.startswith("controlnet_recipe")]
print("client:", type(controlnet).__name__, image.size)
"""


def family_of(project: Path) -> str:
    return json.loads((project / "models/base/base.json").read_text())["family"]


def recipe_of(project: Path) -> str:
    return yaml.safe_load((project / "params.yaml").read_text())["recipe"]


@pytest.mark.slow
def test_stages_through_dvc(transformer_project: Path):
    work, fam = transformer_project, family_of(transformer_project)
    controlnet_class, pipeline_class, base_class = CLASSES[fam]
    index = json.loads((work / "models/base/pipeline/model_index.json").read_text())
    assert index["_class_name"] == base_class and index["transformer"][1] in ("SD3Transformer2DModel", "FluxTransformer2DModel")
    # The cache holds what the family needs: T5 (+ CLIP) features, pooled embeddings, the condition's latents.
    meta = json.loads((work / "data/cache/cache.json").read_text())
    cache = load_dataset_dir(work / "data/cache" / meta["fingerprint"])["train"]
    rows = cache.with_format("torch")[:4]
    assert rows["control_mean"].shape == rows["latent_mean"].shape == (4, tiny.LATENT_CHANNELS, RES // 4, RES // 4)
    assert rows["text_embedding"].shape[-1] == tiny.T5_DIM and cache.features["text_embedding"].dtype == "float16"
    assert meta["shift_factor"] != 0
    config = json.loads((work / "models/adapter/config.json").read_text())
    assert config["_class_name"] == controlnet_class
    metrics = json.loads((work / "eval/metrics.json").read_text())
    assert {"fidelity", "fidelity_base", "beats_base"} <= metrics.keys()
    assert (work / "models/best/diffusion_pytorch_model.safetensors").is_file()  # the sweep chose a checkpoint
    card = model_card(load_config(work / "params.yaml"), BaseRef.read(work / "models/base"), metrics)
    assert f"{pipeline_class}.from_pretrained" in card and "control_image=" in card
    assert "Stage 'train' didn't change" in run([sys.executable, "-m", "dvc", "repro", "train"], work)


@pytest.mark.slow
def test_a_plain_diffusers_client_loads_and_generates(transformer_project: Path, tmp_path: Path):
    fam = family_of(transformer_project)
    cond = load_dataset_dir(transformer_project / "data/captions")["validation"][0]["conditioning_image"]
    cond.save(tmp_path / "condition.png")
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    controlnet_class, pipeline_class, _ = CLASSES[fam]
    args = [controlnet_class, pipeline_class, "models/base/pipeline", "models/adapter", str(tmp_path / "condition.png")]
    out = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=transformer_project,
        env={**_env(), "PYTHONPATH": ""},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"client: {controlnet_class} (64, 64)" in out.stdout


@pytest.mark.slow
def test_generate_cli(transformer_project: Path, tmp_path: Path):
    cond = load_dataset_dir(transformer_project / "data/captions")["validation"][0]["conditioning_image"]
    cond.save(tmp_path / "condition.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "controlnet_recipe", "generate", "--condition", str(tmp_path / "condition.png")]
    run([*cmd, "--prompt", "a photography of a face", "--num-images", "2", "--out", str(out)], transformer_project)
    assert sorted(p.name for p in out.glob("image-*.png")) == ["image-00.png", "image-01.png"]


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_exact(transformer_project: Path, tmp_path: Path):
    assert_kill_and_resume_is_exact(transformer_project, tmp_path, recipe_of(transformer_project))


def someone_elses_flux(folder: Path) -> None:
    """A Flux folder as FluxPipeline.save_pretrained writes it: fresh random weights, saved by
    diffusers alone."""
    from diffusers import FluxPipeline

    tok = tiny.build_tokenizer(["a", "photography", "of", "face"], folder.parent / "tok")
    vae = tiny.build_vae(RES)
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    pipe = FluxPipeline(
        scheduler=tiny.build_flow_scheduler(dynamic_shifting=True), vae=vae, text_encoder=tiny.build_text_encoder(len(tok)),
        tokenizer=tok, text_encoder_2=tiny.build_t5(len(tok)), tokenizer_2=tok, transformer=tiny.build_flux_transformer(),
    )  # fmt: skip
    pipe.save_pretrained(folder)


CONTROL_LORA_CLIENT = """
import sys
import torch
from diffusers import FluxControlPipeline
from PIL import Image

base, lora, condition = sys.argv[1:4]
pipe = FluxControlPipeline.from_pretrained(base)
before = pipe.transformer.x_embedder.in_features
pipe.load_lora_weights(lora)
image = pipe("a photography of a face", control_image=Image.open(condition), num_inference_steps=2, height=64, width=64,
             max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images[0]
assert not [m for m in sys.modules if m.startswith("controlnet_recipe")]
print("client:", before, "->", pipe.transformer.x_embedder.in_features, image.size)
"""


@pytest.mark.slow
def test_a_control_lora_on_a_flux_the_recipe_did_not_build_trains_and_loads_in_flux_control_pipeline(
    transformer_project: Path, tmp_path: Path
):
    """Control-LoRA through dvc repro (train on the base in nf4, evaluate) on a Flux folder
    diffusers wrote, then a client that imports nothing of the project loads it onto that base
    as the model card says and generates."""
    if family_of(transformer_project) != "flux":
        pytest.skip("Control-LoRA is Flux's")
    base = tmp_path / "someone-elses-flux"
    someone_elses_flux(base)
    work = Path(shutil.copytree(transformer_project, tmp_path / "work", symlinks=True))
    p = yaml.safe_load((work / "params.yaml").read_text())
    r = p[p["recipe"]]
    r["base"].update(pretrained_model=str(base), family="auto", max_sequence_length=16, quantize="nf4")  # QLoRA-style
    r["adapter"]["kind"] = "control_lora"
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    run([sys.executable, "-m", "dvc", "repro"], work)
    best = work / "models/best"
    assert json.loads((best / "adapter.json").read_text())["kind"] == "control_lora"
    assert (best / "pytorch_lora_weights.safetensors").is_file() and not (best / "config.json").exists()
    metrics = json.loads((work / "eval/metrics.json").read_text())
    assert metrics["fidelity"] == metrics["fidelity"]  # scored by the same evaluator
    cond = load_dataset_dir(work / "data/captions")["validation"][0]["conditioning_image"]
    cond.save(tmp_path / "condition.png")
    (tmp_path / "client.py").write_text(CONTROL_LORA_CLIENT)
    out = subprocess.run(
        [sys.executable, str(tmp_path / "client.py"), str(base), str(best), str(tmp_path / "condition.png")],
        cwd=tmp_path,
        env={**_env(), "PYTHONPATH": ""},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "client: 16 -> 32 (64, 64)" in out.stdout  # the packed latents' channels, widened as it loads


@pytest.mark.slow
def test_a_control_lora_kill_and_resume_is_bitwise_exact(transformer_project: Path, tmp_path: Path):
    if family_of(transformer_project) != "flux":
        pytest.skip("Control-LoRA is Flux's")
    assert_kill_and_resume_is_exact(transformer_project, tmp_path, recipe_of(transformer_project), adapter_kind="control_lora")


@pytest.mark.slow
def test_a_flux_folder_the_recipe_did_not_build_is_detected_and_trains(transformer_project: Path, tmp_path: Path):
    """Any folder FluxPipeline.save_pretrained wrote (here: fresh random weights, saved by diffusers
    alone) is read as Flux from its model_index.json (family auto) and trains."""
    if family_of(transformer_project) != "flux":
        pytest.skip("the Flux project's data")
    someone_elses_flux(tmp_path / "someone-elses-flux")
    work = Path(shutil.copytree(transformer_project, tmp_path / "work", symlinks=True))
    p = yaml.safe_load((work / "params.yaml").read_text())
    r = p[p["recipe"]]
    r["base"].update(pretrained_model=str(tmp_path / "someone-elses-flux"), family="auto", max_sequence_length=16)
    r["train"].update(max_train_steps=2, checkpointing_steps=2)
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    run([sys.executable, "-m", "dvc", "repro", "train"], work)
    assert json.loads((work / "models/base/base.json").read_text())["family"] == "flux"
    assert json.loads((work / "models/adapter/config.json").read_text())["_class_name"] == "FluxControlNetModel"
    meta = json.loads((work / "data/cache/cache.json").read_text())
    rows = load_dataset_dir(work / "data/cache" / meta["fingerprint"])["train"].with_format("torch")[:1]
    assert rows["text_embedding"].shape[1] == 16  # base.max_sequence_length T5 tokens


@pytest.mark.slow
def test_an_sd_tier_stops_a_transformer_run_in_one_line(transformer_project: Path, tmp_path: Path):
    fam = family_of(transformer_project)
    p = yaml.safe_load((transformer_project / "params.yaml").read_text())
    p[p["recipe"]]["base"]["family"] = "auto"
    p["gpu"] = "24gb"
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = subprocess.run(
        [sys.executable, "-m", "controlnet_recipe", "train", "--params", str(tmp_path / "auto.yaml")],
        cwd=transformer_project, env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: models/base/base.json (family {fam}): gpu: tier '24gb' is sized for family sd; ")
    assert f"{fam}-24gb" in last


def _train_two_processes(work: Path, tier_name: str, shard: bool, out: str) -> dict:
    """Train the project's ControlNet on two CPU processes (as `make train` launches two GPUs) on
    ``tier_name`` as a CPU runs it (fp32, no 8-bit Adam), sharding the frozen base or not; returns
    the run's training.json, with the ControlNet in ``out``."""
    from controlnet_recipe.core.config import Tier
    from controlnet_recipe.training.launch import launch_command

    p = yaml.safe_load((work / "params.yaml").read_text())
    p["gpu"] = tier_name
    p["tiers"][tier_name].update(batch_size=2, mixed_precision="no", use_8bit_adam=False, shard_frozen=shard)
    r = p[p["recipe"]]
    r["train"].update(max_train_steps=3, batch_size=4, checkpointing_steps=3, resume_from_checkpoint=None)
    r["train"]["validation"].update(steps=3, held_out=1, num_images=1)
    name = f"{out}.yaml"
    (work / name).write_text(yaml.safe_dump(p, sort_keys=False))
    cmd = launch_command(Tier.model_validate(p["tiers"][tier_name]), 2, ["train", "--params", name], {})
    log = run(cmd, work)
    assert "deadlock" not in log.lower()
    shutil.move(work / "models/adapter", work / out)
    return json.loads((work / out / "training.json").read_text())


@pytest.mark.slow
@pytest.mark.xdist_group("two_ranks")  # accelerate's port 29500: one such test at a time under make test-slow's -n 2
def test_the_frozen_flux_sharded_across_processes_trains_the_same_controlnet(transformer_project: Path, tmp_path: Path):
    """The multi-GPU tier (FSDP2 on the frozen transformer, DDP on the ControlNet) on two CPU
    processes: each holds half of the frozen base, every process takes part in validation, and the
    ControlNet is bitwise the one the same two processes train with the base held whole."""
    if family_of(transformer_project) != "flux":
        pytest.skip("the Flux tiers")
    import torch
    from safetensors.torch import load_file

    work = Path(shutil.copytree(transformer_project, tmp_path / "work", symlinks=True))
    whole = _train_two_processes(work, "flux-40gb-sharded", False, "whole")
    sharded = _train_two_processes(work, "flux-40gb-sharded", True, "sharded")
    assert whole["processes"] == sharded["processes"] == 2
    ratio = sharded["frozen_gib_per_process"] / whole["frozen_gib_per_process"]
    assert 0.49 < ratio < 0.52, f"each process holds {ratio:.3f} of the frozen base, expected half"
    assert (work / "train/validation.png").is_file() and "val/fidelity" in sharded
    a = load_file(work / "whole/diffusion_pytorch_model.safetensors")
    b = load_file(work / "sharded/diffusion_pytorch_model.safetensors")
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"largest difference {max(diffs.values())}"
