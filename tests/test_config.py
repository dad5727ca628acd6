"""params.yaml is checked once, with one-line errors that name the key and what was expected."""

from __future__ import annotations

import pytest

from controlnet_recipe.cli import main as cli_main
from controlnet_recipe.core.config import ConfigError, accumulation_steps, load_config

from .conftest import ROOT, repo_params


def test_repo_params_load():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.recipe.data.resolution % 8 == 0
    assert cfg.tier.batch_size > 0


def test_source_recipe_block_is_valid():
    """The real recipe (FaceSynthetics, BLIP, SD 2.1-base) has every key and the blog's settings."""
    cfg = load_config(ROOT / "params.yaml", {"recipe": "faces"})
    r = cfg.recipe
    assert (r.data.source, r.data.resolution, r.captions.captioner) == ("facesynthetics", 512, "blip")
    assert r.base.pretrained_model == "stabilityai/stable-diffusion-2-1-base"
    assert (r.train.learning_rate, r.train.batch_size, r.train.num_train_epochs) == (1e-5, 4, 1)
    assert cfg.tiers["16gb"].batch_size == 1 and cfg.tiers["16gb"].use_8bit_adam


def _error(params_file, params: dict) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(params_file(params))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _edit(path: str, value=None, delete: bool = False) -> dict:
    p = repo_params()
    *parents, last = path.split(".")
    node = p
    for k in parents:
        node = node[p["recipe"]] if k == "$recipe" else node[k]
    if delete:
        del node[last]
    else:
        node[last] = value
    return p


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("gpu", "7gb", "gpu: unknown tier '7gb', expected one of auto, cpu, 8gb"),
        ("$recipe.data.resolution", 60, "data.resolution: expected a multiple of 8, got 60"),
        ("$recipe.train.learning_rate", -1.0, "train.learning_rate: expected greater than 0, got -1.0"),
        ("$recipe.train.proportion_empty_prompts", 1.5, "train.proportion_empty_prompts: expected less than or equal to 1"),
        (
            "$recipe.data.source",
            "nope",
            "data.source: expected 'synthetic', 'facesynthetics', 'hub', 'imagefolder' or 'parquet', got 'nope'",
        ),
        (
            "$recipe.captions.captioner",
            "blip2",
            "captions.captioner: expected 'attributes', 'blip', 'template', 'given' or 'none'",
        ),
        ("$recipe.conditions.detector", "dlib", None),
        ("recipe", "nope", "recipe: expected the name of a recipe block"),
        ("tiers.cpu.mixed_precision", "fp8", "tiers.cpu.mixed_precision: expected 'no', 'fp16' or 'bf16'"),
        ("tiers.8gb-zero2.use_8bit_adam", True, "tiers.8gb-zero2: use_8bit_adam: expected false with deepspeed"),
        ("tiers.flux-40gb-sharded.frozen_fp8", True, "tiers.flux-40gb-sharded: shard_frozen: expected deepspeed null and"),
        ("$recipe.train.validation.prompts", ["a", "b", "c"], "demo.train.validation: expected 0, 1 or held_out=4 prompts"),
        ("$recipe.train.num_train_epochs", 2, "demo.train: expected exactly one of max_train_steps and num_train_epochs"),
        ("$recipe.evaluate.push_to_hub", True, "demo.evaluate: expected hub_model_id"),
        ("$recipe.train.report_to", ["mlflow"], "demo.train.report_to.0: expected 'dvclive', 'tensorboard' or 'wandb'"),
    ],
)
def test_bad_values_name_the_key(params_file, path, value, expected):
    if expected is None:  # a good value
        load_config(params_file(_edit(path, value)))
        return
    assert expected in _error(params_file, _edit(path, value))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"data.source": "imagefolder", "data.location": "x", "captions.captioner": "none"},
            "conditions.detector: ground_truth needs landmarks",
        ),
        ({"conditions.kind": "given"}, "conditions.kind: given needs conditioning images from the source"),
        (
            {"data.source": "hub", "data.location": "x", "conditions.detector": "dlib"},
            "captions.captioner: attributes only exist for the synthetic",
        ),
        ({"data.source": "parquet"}, "data: location: expected a URL, file, folder or id for source 'parquet'"),
    ],
)
def test_stages_must_fit_the_source(params_file, changes, expected):
    p = repo_params()
    for key, value in changes.items():
        section, name = key.split(".")
        p["demo"][section][name] = value
    assert expected in _error(params_file, p)


def test_missing_key(params_file):
    msg = _error(params_file, _edit("$recipe.evaluate.seed", delete=True))
    assert msg.endswith("demo.evaluate.seed: missing key")


def test_unknown_key(params_file):
    p = repo_params()
    p["demo"]["train"]["learning_rat"] = 1e-4
    assert "demo.train.learning_rat: unknown key" in _error(params_file, p)


def test_not_a_mapping(params_file, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_cli_prints_one_line_and_exits_2(params_file, capsys):
    code = cli_main(["check", "--params", str(params_file(_edit("gpu", "3gb")))])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "unknown tier '3gb'" in err


def test_cli_gpu_override_checked(params_file, capsys):
    assert cli_main(["check", "--params", str(params_file(repo_params())), "--gpu", "16gb"]) == 0
    assert cli_main(["check", "--params", str(params_file(repo_params())), "--gpu", "huge"]) == 2


@pytest.mark.parametrize(
    ("effective", "micro", "procs", "expected"), [(4, 1, 1, (1, 4)), (16, 16, 1, (16, 1)), (16, 2, 2, (2, 4)), (4, 8, 1, (4, 1))]
)
def test_accumulation_keeps_effective_batch(effective, micro, procs, expected):
    got = accumulation_steps(effective, micro, procs)
    assert got == expected
    assert got[0] * got[1] * procs == effective


def test_accumulation_rejects_uneven_batch():
    with pytest.raises(ConfigError, match="train.batch_size"):
        accumulation_steps(6, 4, 1)


def test_validation_images_and_prompts_must_pair(params_file):
    p = _edit("$recipe.train.validation.images", ["a.png", "b.png"])
    p["demo"]["train"]["validation"]["prompts"] = ["x", "y", "z"]
    assert "demo.train.validation: expected as many images as prompts (or one of either), got 2 images and 3 prompts" in _error(
        params_file, p
    )
    for prompts in (["x"], ["x", "y"], []):  # N:1, N:N, N:0 pair
        p["demo"]["train"]["validation"]["prompts"] = prompts
        load_config(params_file(p))


def test_every_tier_checked_before_anything_runs(params_file):
    p = repo_params()
    p["tiers"]["16gb"]["batch_size"] = 0
    assert "tiers.16gb.batch_size: expected greater than 0" in _error(params_file, p)
