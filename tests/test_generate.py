"""The inference CLI (`python -m controlnet_recipe generate`) on the tiny pipeline's models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet_recipe import cli
from controlnet_recipe.apps.generate import GenerateError, Generator, Settings, default_model, grid_cell
from controlnet_recipe.core.config import load_config
from controlnet_recipe.core.storage import ADAPTER_DIR, BEST_DIR, CAPTIONS_DIR, load_dataset_dir
from controlnet_recipe.faces.draw import PALETTE, PARTS
from controlnet_recipe.report.grid import TITLE_HEIGHT

from .conftest import tiny_params

RES = tiny_params()[tiny_params()["recipe"]]["data"]["resolution"]
PROMPT = "a face with light skin and brown hair, smiling"


@pytest.fixture(scope="session")
def astronaut(tmp_path_factory) -> Path:
    """scikit-image's astronaut photo as a PNG file: a real photo with a face dlib finds."""
    from skimage.data import astronaut

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(astronaut()).save(path)
    return path


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
