"""The inference CLI (`python -m controlnet_recipe generate`) on the tiny pipeline's models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet_recipe import cli
from controlnet_recipe.apps.generate import GenerateError, Generator, Settings, centre_square, default_model, fit, grid_cell
from controlnet_recipe.core.config import load_config
from controlnet_recipe.core.storage import ADAPTER_DIR, BEST_DIR, CAPTIONS_DIR, load_dataset_dir
from controlnet_recipe.faces.draw import PALETTE, PARTS
from controlnet_recipe.report.grid import TITLE_HEIGHT

from .conftest import _env, tiny_params

RES = tiny_params()[tiny_params()["recipe"]]["data"]["resolution"]
PROMPT = "a face with light skin and brown hair, smiling"


@pytest.fixture(scope="session")
def astronaut(tmp_path_factory) -> Path:
    """scikit-image's astronaut photo as a PNG file: a real photo with a face dlib finds."""
    from skimage.data import astronaut

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(astronaut()).save(path)
    return path


@pytest.fixture(scope="session")
def landscape(tmp_path_factory, astronaut: Path) -> Path:
    """The astronaut on a 3:2 grey canvas (768 x 512): a landscape photo with a face dlib finds."""
    photo = Image.new("RGB", (768, 512), (128, 128, 128))
    photo.paste(Image.open(astronaut), (128, 0))
    path = tmp_path_factory.mktemp("photos") / "landscape.png"
    photo.save(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """An untrained tiny SD base and a ControlNet copied from its UNet, saved where the base and
    train stages save them (models/base, models/adapter): seconds, where ``project`` runs the pipeline."""
    import torch

    from controlnet_recipe.core.storage import write_json
    from controlnet_recipe.faces.synthetic import CAPTION_WORDS
    from controlnet_recipe.models import tiny
    from controlnet_recipe.models.base_model import BASE_FILE, BaseRef
    from controlnet_recipe.models.families import family
    from controlnet_recipe.models.families.sd import controlnet_from_unet

    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    fam = family("sd")
    tok = tiny.build_tokenizer(CAPTION_WORDS, root / "tokenizer")
    parts = fam.tiny_components(tok, len(tok), fam.tiny_text_encoder(len(tok)), tiny.build_vae(RES), RES)
    fam.pipeline(parts, scheduler=parts.noise_scheduler).save_pretrained(root / "models/base/pipeline")
    write_json(root / "models/base" / BASE_FILE, BaseRef("models/base/pipeline", family="sd").__dict__)
    controlnet_from_unet(parts.denoiser, parts.vae.config, "random").save_pretrained(root / "models/adapter")
    return root


def bucket_params(folder: Path, buckets) -> Path:
    """The tiny params with ``data.buckets`` set, written into ``folder``."""
    import yaml

    p = tiny_params()
    p[p["recipe"]]["data"]["buckets"] = buckets
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


@pytest.fixture
def in_tiny(tiny_models: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tiny_models)  # models/ is relative to the working directory
    return tiny_models


@pytest.fixture
def in_project(project: Path, monkeypatch) -> Path:
    monkeypatch.chdir(project)  # stage paths (models/, data/) are relative to the project
    return project


def generate(*args: str) -> int:
    return cli.main(["generate", *args])


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def check_outputs(out: Path, n: int, with_photo: bool) -> None:
    assert Image.open(out / "condition.png").size == (RES, RES)
    for i in range(n):
        assert Image.open(out / f"image-{i:02d}.png").size == (RES, RES)
    assert not (out / f"image-{n:02d}.png").exists()
    cell = grid_cell(RES)
    assert Image.open(out / "grid.png").size == ((n + 1 + with_photo) * cell, cell + TITLE_HEIGHT)
    info = json.loads((out / "generation.json").read_text())
    assert info["num_images"] == n and info["prompt"] == PROMPT and info["resolution"] == RES


@pytest.mark.slow
def test_generate_from_condition(in_project: Path, tmp_path: Path, capsys):
    cond = load_dataset_dir(CAPTIONS_DIR)["validation"][0]["conditioning_image"]
    path = tmp_path / "condition.png"
    cond.save(path)
    out = tmp_path / "out"
    assert generate("--condition", str(path), "--prompt", PROMPT, "--num-images", "3", "--seed", "5", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "grid.png" in printed
    check_outputs(out, 3, with_photo=False)
    info = json.loads((out / "generation.json").read_text())
    assert info["seed"] == 5 and info["model"] == str(BEST_DIR)  # the checkpoint the evaluate stage chose
    assert info["steps"] == tiny_params()["demo"]["evaluate"]["num_inference_steps"]  # the evaluate block's default
    assert np.array_equal(np.asarray(Image.open(out / "condition.png")), np.asarray(cond.convert("RGB")))


@pytest.mark.slow
def test_generate_from_photo(in_project: Path, tmp_path: Path, astronaut: Path, capsys):
    out = tmp_path / "out"
    assert generate("--photo", str(astronaut), "--prompt", PROMPT, "--num-images", "2", "--out", str(out)) == 0
    check_outputs(out, 2, with_photo=True)
    cond = np.asarray(Image.open(out / "condition.png"))
    skin = PALETTE[PARTS.index("skin")]
    assert (np.abs(cond.astype(int) - skin).sum(-1) < 30).sum() > 20  # a face drawn with the palette's skin
    assert (cond.sum(-1) == 0).mean() > 0.5  # on black


@pytest.mark.slow
def test_seed_per_image_whatever_the_batching(in_project: Path):
    cfg = load_config("params.yaml")
    gen = Generator(cfg)
    cond = gen.condition(condition=load_dataset_dir(CAPTIONS_DIR)["validation"][0]["conditioning_image"])
    five = gen(cond, Settings.from_recipe(cfg, PROMPT, num_images=5, seed=7))  # two batches: 4 + 1
    one = gen(cond, Settings.from_recipe(cfg, PROMPT, num_images=1, seed=11))
    assert len(five) == 5
    diff = np.abs(np.asarray(five[4], dtype=int) - np.asarray(one[0], dtype=int))
    assert diff.max() <= 2


@pytest.mark.slow
def test_no_face_in_photo(in_project: Path, tmp_path: Path, capsys):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(blank)
    assert generate("--photo", str(blank), "--prompt", PROMPT, "--out", str(tmp_path / "out")) == 2
    err = one_error(capsys)
    assert f"no face found in {blank}" in err
    assert not (tmp_path / "out").exists()


def test_unreadable_image(in_tmp: Path, params_file, capsys):
    params = str(params_file(tiny_params()))
    text = in_tmp / "notes.png"
    text.write_text("not a picture")
    assert generate("--params", params, "--photo", str(text), "--prompt", PROMPT) == 2
    assert f"{text}: cannot read the image (not an image)" in one_error(capsys)
    assert generate("--params", params, "--condition", "missing.png", "--prompt", PROMPT) == 2
    assert "missing.png: cannot read the image (no such file)" in one_error(capsys)


def test_no_trained_model(in_tmp: Path, params_file, astronaut: Path, capsys):
    params = str(params_file(tiny_params()))  # in a folder where nothing was trained yet
    assert generate("--params", params, "--photo", str(astronaut), "--prompt", PROMPT) == 2
    err = one_error(capsys)
    assert f"no trained model in {BEST_DIR} or {ADAPTER_DIR}" in err and "make demo" in err and "make train" in err
    assert generate("--params", params, "--photo", str(astronaut), "--prompt", PROMPT, "--model", "elsewhere") == 2
    assert "elsewhere: no trained model here" in one_error(capsys)


def test_default_model_prefers_the_evaluated_checkpoint(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GenerateError, match="make demo"):
        default_model()
    for d in (ADAPTER_DIR, BEST_DIR):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        if d == BEST_DIR:  # no weights: not a trained model
            assert default_model() == ADAPTER_DIR
        (d / "diffusion_pytorch_model.safetensors").write_bytes(b"")
        assert default_model() == d


def test_generate_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--photo", "--condition", "--prompt", "--negative-prompt", "--num-images", "--seed", "--steps", "--guidance"):
        assert opt in out
    assert "--conditioning-scale" in out and "--model" in out and "--out" in out


def test_stages_still_reject_unknown_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["check", "--photo", "x.png"])
    assert e.value.code == 2
    assert "unrecognized arguments: --photo x.png" in capsys.readouterr().err


LANDSCAPE_BUCKET = (80, 48)  # auto's buckets at 64 px (sides divide by 16): the one nearest 3:2


@pytest.mark.parametrize("source", ["--photo", "--condition"])
def test_generate_at_the_inputs_aspect_with_buckets(in_tiny: Path, tmp_path: Path, landscape: Path, source: str):
    params = str(bucket_params(tmp_path, "auto"))
    out = tmp_path / "out"
    args = [source, str(landscape), "--prompt", PROMPT, "--num-images", "2", "--out", str(out)]
    assert generate("--params", params, *args) == 0
    cond = Image.open(out / "condition.png")
    assert cond.size == LANDSCAPE_BUCKET  # the input's aspect, not the square
    assert [Image.open(out / f"image-{i:02d}.png").size for i in range(2)] == [LANDSCAPE_BUCKET] * 2
    info = json.loads((out / "generation.json").read_text())
    assert info["bucket"] == "80x48" and info["resolution"] == RES
    if source == "--condition":  # given: resized to cover the bucket, centre crop, as training does
        assert np.array_equal(np.asarray(cond), np.asarray(fit(Image.open(landscape), LANDSCAPE_BUCKET)))
    else:  # the face drawn where it is in the landscape photo
        assert (np.asarray(cond).sum(-1) > 0).mean() > 0.01
    grid = np.asarray(Image.open(out / "grid.png"))
    cell = grid_cell(LANDSCAPE_BUCKET)
    cols = 2 + 1 + (source == "--photo")
    assert grid.shape[:2] == (cell + TITLE_HEIGHT, cols * cell)
    assert (grid[TITLE_HEIGHT + 2, -cell // 2] == 255).all()  # letterboxed: white above the wide image


def test_generate_stays_square_with_buckets_off(in_tiny: Path, tmp_path: Path, landscape: Path):
    from controlnet_recipe.conditions import condition as condition_kind

    params = bucket_params(tmp_path, "off")
    out = tmp_path / "out"
    args = ["--photo", str(landscape), "--prompt", PROMPT, "--num-images", "2", "--out", str(out)]
    assert generate("--params", str(params), *args) == 0
    check_outputs(out, 2, with_photo=True)
    assert "bucket" not in json.loads((out / "generation.json").read_text())
    cfg = load_config(params)
    photo = Image.open(landscape).convert("RGB")
    before = fit(condition_kind(cfg.recipe.conditions).from_photo(centre_square(photo), "x"), RES)  # as before buckets
    assert np.array_equal(np.asarray(Image.open(out / "condition.png")), np.asarray(before))


def test_a_condition_of_another_size_is_fitted_to_its_bucket(in_tiny: Path, tmp_path: Path):
    cfg = load_config(bucket_params(tmp_path, "auto"))
    gen = Generator(cfg)
    assert gen.buckets == [(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]
    images = gen(Image.new("RGB", (150, 100), "white"), Settings.from_recipe(cfg, PROMPT, num_images=1))
    assert images[0].size == LANDSCAPE_BUCKET
    assert gen.size_text(Image.new("RGB", (48, 80))) == "48x80"


# A client that knows nothing of this project: only diffusers, torch and PIL, as the model card tells users.
CLIENT = """
import sys
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

base, model = sys.argv[1:3]
controlnet = ControlNetModel.from_pretrained(model)
pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=controlnet, safety_checker=None)
image = pipe(
    "a photography of a face", image=Image.new("RGB", (80, 48), "white"), num_inference_steps=2, height=48, width=80,
    generator=torch.Generator().manual_seed(0),
).images[0]
assert not [m for m in sys.modules if m.startswith("controlnet_recipe")]
print("client:", image.size)
"""


def test_a_plain_diffusers_client_generates_at_a_non_square_size(tiny_models: Path, tmp_path: Path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    out = subprocess.run(
        [sys.executable, str(script), "models/base/pipeline", "models/adapter"],
        cwd=tiny_models,
        env={**_env(), "PYTHONPATH": ""},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "client: (80, 48)" in out.stdout  # sides divide by 16 (the tiny base's), not square
