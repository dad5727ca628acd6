"""The condition seam: map types read from the data, scores that fit each type, conditions made by
tiny transformers models (depth, segmentation) in the stage and in generate alike, and folders of
given pairs of each type (categorical, binary, continuous) through every stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from controlnet_recipe import cli
from controlnet_recipe.conditions import KINDS, condition
from controlnet_recipe.conditions.maps import MapType, discover
from controlnet_recipe.core.config import load_config
from controlnet_recipe.faces.draw import draw_depth, draw_outline, draw_segmentation
from controlnet_recipe.faces.synthetic import make_face

from .conftest import ROOT, merge, tiny_params

DRAW = {"categorical": draw_segmentation, "binary": draw_outline, "continuous": draw_depth}


def _maps(kind: str, n: int = 12, size: int = 64) -> list[Image.Image]:
    return [DRAW[kind]([make_face(i, size)[1]], (size, size)) for i in range(n)]


@pytest.mark.parametrize("kind", ["categorical", "binary", "continuous"])
def test_the_map_type_is_read_from_the_conditions(kind: str):
    t = discover(_maps(kind), 64)
    assert t.kind == kind and t.why.startswith(kind)
    assert t.headline == {"categorical": "extractor_miou", "binary": "extractor_f1", "continuous": "extractor_ssim"}[kind]
    if kind == "categorical":
        assert len(t.palette) == 10 and t.palette[0] == (0, 0, 0) and t.ignore == 0  # the face palette, background first
    if kind == "binary":
        assert t.palette == ((0, 0, 0), (255, 255, 255))
    assert MapType.from_json(json.loads(json.dumps(t.to_json()))) == t


@pytest.mark.parametrize("kind", ["categorical", "binary", "continuous"])
def test_scores_fit_the_type_and_can_fail(kind: str):
    """A map against itself scores perfectly; against another face's map, worse."""
    maps = _maps(kind, 3)
    t = discover(maps, 64)
    target = t.targets(maps, 64).numpy()
    if kind == "continuous":
        target = target.transpose(0, 2, 3, 1)
    same, other = t.score(target[0], target[0]), t.score(target[1], target[0])
    head = t.headline
    assert same[head] == pytest.approx(1.0) and other[head] < 0.9
    if kind == "continuous":
        assert same["extractor_rmse"] == 0.0 and other["extractor_rmse"] > 0.01


def test_stated_map_type_overrides_what_the_data_looks_like():
    from controlnet_recipe.core.config import ConditionsCfg

    c = ConditionsCfg(kind="given", detector="dlib", canny_low=1, canny_high=2, map_type="continuous", num_proc=None)
    t = condition(c).map_type(_maps("categorical"), 64)
    assert t.kind == "continuous" and "stated" in t.why


def test_no_kind_dispatch_outside_the_conditions_package():
    """Stages, generate, web and reports ask the recipe's condition; only conditions/ and
    config.py name a kind."""
    names = "|".join(KINDS)
    pattern = re.compile(rf"\.kind\s*(==|!=|in)\s|[\"']({names})[\"']")
    src = ROOT / "src" / "controlnet_recipe"
    found = [
        f"{f.relative_to(src)}:{i}: {line.strip()}"
        for f in sorted(src.rglob("*.py"))
        if f.parent.name != "conditions" and f.name != "config.py"
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if pattern.search(line) and "captioner" not in line  # captions.captioner has a "given" too
    ]
    assert found == []


# -- conditions made by models -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_depth(tmp_path_factory) -> Path:
    """A tiny DPT depth estimator, built from a config and saved with save_pretrained."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    cfg = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
        neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3], head_in_index=-1,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-depth")
    DPTForDepthEstimation(cfg).save_pretrained(path)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_segformer(tmp_path_factory) -> Path:
    """A tiny SegFormer semantic segmenter with five labels, saved with save_pretrained."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(0)
    labels = {i: f"part{i}" for i in range(5)}
    cfg = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3], strides=[2, 2],
        num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=5, id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-segformer")
    SegformerForSemanticSegmentation(cfg).save_pretrained(path)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _write_params(tmp: Path, recipe: dict) -> Path:
    p = tiny_params()
    p["demo"] = merge(p["demo"], recipe)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


@pytest.mark.parametrize("kind", ["depth", "segmentation"])
def test_model_made_conditions_in_the_stage_and_in_generate(kind, tiny_depth, tiny_segformer, tmp_path, monkeypatch):
    """The conditions stage runs the model batched over the source images; generate (and so the
    web demo) makes the same map from a photo; the evaluation re-extracts it with a model."""
    from controlnet_recipe.apps.generate import make_condition
    from controlnet_recipe.core.storage import CONDITIONS_DIR, load_dataset_dir
    from controlnet_recipe.stages.conditions import build_conditions
    from controlnet_recipe.stages.data import build_data
    from controlnet_recipe.stages.photoreal import build_photoreal

    monkeypatch.chdir(tmp_path)
    model = str(tiny_depth if kind == "depth" else tiny_segformer)
    data = {"num_train": 10, "num_validation": 2, "shard_size": 4}
    cfg = load_config(_write_params(tmp_path, {"data": data, "conditions": {"kind": kind, "model": model, "batch_size": 3}}))
    build_data(cfg, cache_dir=Path("downloads"))
    build_photoreal(cfg)
    report = build_conditions(cfg)
    assert report["kind"] == kind and report["model"] == model and report["splits"]["train"]["kept"] == 10
    row = load_dataset_dir(CONDITIONS_DIR)["train"][0]
    made = np.asarray(row["conditioning_image"].convert("RGB"))
    assert made.shape == (64, 64, 3) and made.std() > 0
    again = make_condition(cfg, photo=row["image"])
    assert np.array_equal(np.asarray(again), made)  # drawn the same way in the stage and in generate
    cond = condition(cfg.recipe.conditions)
    t = cond.map_type([], 64)
    assert t.kind == ("continuous" if kind == "depth" else "categorical")
    scores = cond.fidelity(cfg.recipe, tmp_path, None).scores([row["image"]] * 2, [row["conditioning_image"]] * 2, [None, None])
    assert set(scores) == ({"reextracted_ssim", "reextracted_rmse"} if kind == "depth" else {"reextracted_miou"})
    assert all(np.isfinite(v).all() for v in scores.values())


def test_a_model_made_kind_needs_a_model(tmp_path):
    from controlnet_recipe.core.errors import RecipeError

    with pytest.raises(RecipeError, match="conditions.model"):
        load_config(_write_params(tmp_path, {"conditions": {"kind": "depth"}}))


# -- given pairs of each type, through every stage --------------------------------------------


def _pairs(root: Path, kind: str, n: int = 20, size: int = 64) -> Path:
    for sub in ("images", "conditions"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        img, lm, _ = make_face(1000 + i, size)
        img.save(root / "images" / f"{i:03d}.png")
        DRAW[kind]([lm], (size, size)).save(root / "conditions" / f"{i:03d}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["categorical", "binary", "continuous"])
def test_given_pairs_of_each_type_end_to_end(kind: str, tmp_path: Path, monkeypatch):
    """A folder of pairs with ``conditions.kind: given``: the evaluator reads the map type from
    the conditions, the evaluation reports the metric that fits it, and no face metric appears."""
    monkeypatch.chdir(tmp_path)
    folder = _pairs(tmp_path / "pairs", kind)
    data = {
        "source": "imagefolder", "location": str(folder / "images"), "conditioning_folder": str(folder / "conditions"),
        "num_train": None, "num_validation": 4,
    }  # fmt: skip
    params = _write_params(tmp_path, {"data": data, "conditions": {"kind": "given"}, "captions": {"captioner": "template"}})
    for stage in ("data", "photoreal", "conditions", "captions", "base", "cache", "evaluator", "train", "evaluate"):
        assert cli.main([stage, "--params", str(params)]) == 0, stage
    metrics = json.loads(Path("eval/metrics.json").read_text())
    summary = json.loads(Path("eval/summary.json").read_text())
    head = {"categorical": "extractor_miou", "binary": "extractor_f1", "continuous": "extractor_ssim"}[kind]
    assert metrics["fidelity_metric"] == head and summary["fidelity"]["map_type"] == kind
    assert summary["fidelity"]["map_type_why"].startswith(kind)
    assert not [k for k in metrics if "face" in k or "nme" in k or k.startswith("miou")]
    report = Path("eval/report.html").read_text()
    assert "face appears" not in report and "NME" not in report and f"Why <code>{head}</code>" in report
    assert Path("train/live/plots/metrics/val/fidelity.tsv").is_file()  # validation scored by the extractor
