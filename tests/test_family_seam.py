"""A model family is one module (plus its params block and tests): a toy family, written here as a
new family module would be, and its tiers in params, is checked, refused on another family's tier,
and planned by the GPU-memory planner on its own tiers with the models it hands the planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import CLIPTextConfig

from controlnet_recipe.core.config import ConfigError, check_tier, load_config
from controlnet_recipe.models import tiny
from controlnet_recipe.models.families import FAMILIES, family_of_architecture
from controlnet_recipe.models.families.sd import StableDiffusion, UNetMeasured
from controlnet_recipe.planning import cli as plan_cli

from .conftest import repo_params

BUILT: list[str] = []


class ToyMeasured(UNetMeasured):
    """The toy family's models for the planner: SD's, counted."""

    def __init__(self, spec) -> None:
        BUILT.append(spec.arch)
        super().__init__(spec)


class Toy(StableDiffusion):
    """What a new family module holds: its names, its pipelines, its planner models."""

    name = "toy"
    title = "Toy Diffusion"
    hub_tag = "toy-diffusion"
    pipelines = ("ToyPipeline",)
    measured = property(lambda self: ToyMeasured)


@pytest.fixture
def toy(monkeypatch, tmp_path: Path) -> Path:
    """The toy family registered, and a toy architecture folder (tiny configs, a ToyPipeline index)."""
    monkeypatch.setitem(FAMILIES, "toy", Toy())
    arch = tmp_path / "toy-base"
    tiny.build_unet(64).save_config(arch / "unet")
    tiny.build_vae(64).save_config(arch / "vae")
    text = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=tiny.TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    text.save_pretrained(arch / "text_encoder")
    (arch / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipeline"}))
    return arch


def _toy_params(tmp_path: Path, arch: Path) -> Path:
    p = repo_params()
    p["toy"] = {**p["demo"], "base": {**p["demo"]["base"], "pretrained_model": str(arch), "family": "toy"}}
    p["recipe"] = "toy"
    p["tiers"]["toy-8gb"] = {**p["tiers"]["8gb"], "family": "toy", "memory_gb": 8}
    p["tiers"]["toy-16gb"] = {**p["tiers"]["16gb"], "family": "toy", "memory_gb": 16}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def test_a_toy_family_is_one_module_and_its_params(toy: Path, tmp_path: Path, capsys):
    params = _toy_params(tmp_path, toy)
    cfg = load_config(params, {"gpu": "toy-16gb"})
    assert cfg.recipe.base.family == "toy" and cfg.tier.memory_gb == 16
    assert family_of_architecture(str(toy)) == "toy"
    with pytest.raises(
        ConfigError, match="gpu: tier '16gb' is sized for family sd; a base of family toy needs one of toy-8gb, toy-16gb"
    ):
        check_tier("16gb", "toy", cfg.tiers)
    auto = load_config(params)
    assert plan_cli.tiers_for("toy", auto.tiers)[-2:] == ["toy-8gb", "toy-16gb"]  # gpu: auto plans these too
    BUILT.clear()
    assert plan_cli.main(load_config(params, {"gpu": "toy-8gb"}), []) == 0
    out = capsys.readouterr().out
    row = out.splitlines()[2].split()
    assert set(BUILT) == {str(toy)}  # the planner built the toy family's own models (its FLOP count: in fp32)
    assert row[:2] == ["toy-8gb", "controlnet"]  # the tier and the kind of control planned
    assert float(row[4].split("/")[0]) > 0  # the step's TFLOP per sample (model/with recomputation)
    assert float(row[7]) == pytest.approx(8 * 0.9375, abs=0.05)  # the card the tier names
    assert row[8] == "yes"


def test_a_family_no_tier_is_sized_for_is_refused_in_one_line(toy: Path, tmp_path: Path):
    params = _toy_params(tmp_path, toy)
    p = yaml.safe_load(params.read_text())
    p["toy"]["base"]["family"] = "toyxl"
    params.write_text(yaml.safe_dump(p, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        load_config(params)
    assert str(e.value) == (
        f"{params}: toy.base.family: expected auto or a family that tiers are sized for (sd, sdxl, sd3, flux, toy), got 'toyxl'"
    )
