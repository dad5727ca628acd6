"""Aspect-ratio buckets (data.buckets), from data to generate: the buckets, the crop that keeps
image and condition aligned to the pixel (given and made), batches that never mix sizes, and a
folder of mixed aspects trained end to end through dvc repro."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from controlnet_recipe.conditions.canny import canny
from controlnet_recipe.core import buckets as B
from controlnet_recipe.core.config import ConfigError, load_config
from controlnet_recipe.core.errors import BadInput
from controlnet_recipe.core.storage import CONDITIONS_DIR, DATA_DIR, load_dataset_dir, read_json
from controlnet_recipe.faces.draw import PALETTE
from controlnet_recipe.faces.mixed_folder import write_mixed_folder
from controlnet_recipe.stages.conditions import build_conditions
from controlnet_recipe.stages.data import build_data
from controlnet_recipe.stages.photoreal import build_photoreal
from controlnet_recipe.training.batches import BucketBatches

from .conftest import TINY, make_project, merge, repo_params, run
from .test_resume import assert_kill_and_resume_is_exact


def mixed_folder(root: Path, per_aspect: int = 10, half_size_conditions: bool = False, copies: bool = False) -> Path:
    return write_mixed_folder(root, per_aspect, half_size_conditions=half_size_conditions, copies=copies)


def bucket_params(folder: Path, **data) -> dict:
    """The tiny demo on ``folder``: an image folder with given conditions, buckets auto."""
    p = repo_params()
    r = merge(p["demo"], TINY)
    r["data"].update(
        source="imagefolder", location=str(folder), conditioning_folder="conditions", num_train=None, num_validation=8
    )
    r["data"].update(min_size=8, buckets="auto", **data)
    r["conditions"]["kind"] = "given"
    r["captions"].update(captioner="template", template="a photo of a face")
    p["demo"], p["tiers"]["cpu"] = r, {**p["tiers"]["cpu"], "batch_size": 4}
    return p


def test_auto_buckets_cover_every_aspect_at_the_pixel_count():
    for res, mult in ((64, 16), (512, 64), (1024, 32), (512, 16)):
        bs = B.auto_buckets(res, mult, 4.0)
        assert (res, res) in bs
        assert all(w % mult == 0 and h % mult == 0 and w * h <= res * res for w, h in bs)
        assert all(max(w, h) / min(w, h) <= 4.0 for w, h in bs)
        assert set(bs) == {(h, w) for w, h in bs}  # both orientations
        assert min(w * h for w, h in bs) > res * res / 2
    assert B.nearest(3000, 4000, B.auto_buckets(512, 64, 4.0)) == (448, 576)
    assert B.nearest(1920, 1080, B.auto_buckets(512, 64, 4.0)) == (640, 384)


def test_skip_reasons_and_a_stated_list():
    bs = B.auto_buckets(64, 16, 4.0)
    assert B.skip_reason(200, 10, bs, 4.0) == B.SKIP_ASPECT
    assert B.skip_reason(30, 30, bs, 4.0) == B.SKIP_SMALL
    assert B.skip_reason(150, 50, bs, 4.0) is None
    assert B.bucket_list(["64x64", "48x80"], 64, 16, 4.0) == [(48, 80), (64, 64)]
    with pytest.raises(ValueError, match="data.buckets: 50x64: expected sides that are multiples of 16"):
        B.bucket_list(["50x64"], 64, 16, 4.0)


def test_a_bad_bucket_in_params_is_one_line(params_file):
    p = repo_params()
    p["demo"]["data"]["buckets"] = ["64x64", "wide"]
    with pytest.raises(ConfigError, match=r"demo.data.buckets.*'wide': expected WIDTHxHEIGHT"):
        load_config(params_file(p))


def test_points_move_with_the_crop():
    img = Image.new("RGB", (150, 50))
    ImageDraw.Draw(img).rectangle((100, 20, 101, 21), fill=(255, 255, 255))
    crop = B.cover(150, 50, (128, 32))
    out = np.asarray(B.fit_to_bucket(img, crop, resample=Image.NEAREST)).sum(-1)
    x, y = B.move_points([[100.5, 20.5]], (150, 50), crop)[0]
    ys, xs = np.nonzero(out)
    assert abs(xs.mean() + 0.5 - x) < 1 and abs(ys.mean() + 0.5 - y) < 1


def _stages(tmp_path: Path, monkeypatch, kind: str, half: bool = False, copies: bool = False, map_type: str = "auto"):
    folder = mixed_folder(tmp_path, per_aspect=3, half_size_conditions=half, copies=copies)
    monkeypatch.chdir(tmp_path)
    p = bucket_params(folder)
    p["demo"]["data"]["num_validation"] = 2
    p["demo"]["conditions"].update(kind=kind, map_type=map_type)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    cfg = load_config(tmp_path / "params.yaml")
    report = build_data(cfg, cache_dir=Path("downloads"))
    build_photoreal(cfg)
    return report, build_conditions(cfg), load_dataset_dir(CONDITIONS_DIR)


def _rows(ds):
    for split in ds.values():
        yield from split


def test_given_conditions_stay_aligned_to_the_pixel_in_every_bucket(tmp_path: Path, monkeypatch):
    report, conditions, ds = _stages(tmp_path, monkeypatch, "given")
    palette = {tuple(c) for c in PALETTE}
    assert report["skipped"] == {B.SKIP_ASPECT: 1, B.SKIP_SMALL: 1}
    counts = sum((Counter(split) for split in report["buckets"].values()), Counter())
    assert set(counts) == {"48x80", "80x48", "64x64", "128x32"} and sum(counts.values()) == 12
    for row in _rows(ds):
        img, cond = row["image"], row["conditioning_image"]
        assert img.size == cond.size == B.parse(row["bucket"])
        assert {tuple(c) for c in np.asarray(cond).reshape(-1, 3)} <= palette  # nearest: a map's classes stay pure
        # the same resize and crop as the photo: the face's outline in the condition sits on the face
        face = np.asarray(cond).any(-1)
        photo = np.abs(np.asarray(img, dtype=int) - np.asarray(img, dtype=int)[0, 0]).sum(-1) > 30
        assert (face & photo).sum() / face.sum() > 0.9, row["id"]
    grid = Image.open(DATA_DIR / "samples.png")
    assert grid.size[1] > 4 * 128  # one row per bucket
    assert conditions["buckets"] == report["buckets"]


def test_a_given_condition_that_is_the_photo_stays_equal_to_it_in_every_bucket(tmp_path: Path, monkeypatch):
    # stated continuous: resized as the photo is (bicubic); else nearest, below
    _, _, ds = _stages(tmp_path, monkeypatch, "given", copies=True, map_type="continuous")
    buckets = set()
    for row in _rows(ds):
        assert np.array_equal(np.asarray(row["conditioning_image"]), np.asarray(row["image"])), row["id"]
        buckets.add(row["bucket"])
    assert buckets == {"48x80", "80x48", "64x64", "128x32"}


def test_given_conditions_at_half_size_are_brought_to_the_photo_first(tmp_path: Path, monkeypatch):
    _, _, ds = _stages(tmp_path, monkeypatch, "given", half=True)
    for row in _rows(ds):
        face = np.asarray(row["conditioning_image"]).any(-1)
        ys, xs = np.nonzero(face)
        img = np.asarray(row["image"], dtype=int)
        photo = np.abs(img - img[0, 0]).sum(-1) > 30
        py, px = np.nonzero(photo & face)
        assert abs(xs.mean() - px.mean()) < 1.5 and abs(ys.mean() - py.mean()) < 1.5, row["id"]


def test_made_conditions_are_made_from_exactly_the_crop(tmp_path: Path, monkeypatch):
    _, _, ds = _stages(tmp_path, monkeypatch, "canny")
    n = 0
    for row in _rows(ds):
        assert row["image"].size == B.parse(row["bucket"])
        assert np.array_equal(np.asarray(row["conditioning_image"]), np.asarray(canny(row["image"], 100, 200)))
        n += 1
    assert n == 12


def test_no_batch_mixes_buckets_and_a_resumed_sampler_reads_the_same():
    sizes = [7, 1, 12, 3]
    owner = np.repeat(np.arange(len(sizes)), sizes)
    for world in (1, 2):
        batches = [BucketBatches(sizes, 2, seed=5, rank=r, world=world) for r in range(world)]
        per_epoch = batches[0].per_epoch
        assert per_epoch == sum(math.ceil(n / (2 * world)) for n in sizes)
        streams = [iter(b) for b in batches]
        seen = []
        for _ in range(3 * per_epoch):
            step = [next(s) for s in streams]
            assert len({int(owner[i]) for b in step for i in b}) == 1  # one bucket per global micro-batch
            assert all(len(b) == 2 for b in step)
            seen.append(step)
        epoch = {i for step in seen[:per_epoch] for b in step for i in b}
        assert epoch == set(range(sum(sizes)))  # every sample, every epoch
        for start in (0, 1, per_epoch - 1, per_epoch + 3):
            resumed = [iter(BucketBatches(sizes, 2, seed=5, start=start, rank=r, world=world)) for r in range(world)]
            assert [[next(s) for s in resumed] for _ in range(per_epoch)] == seen[start : start + per_epoch]


@pytest.fixture(scope="session")
def bucket_project(tmp_path_factory) -> Path:
    """The tiny demo on a folder of mixed aspects with given conditions, buckets auto, after `dvc repro`."""
    work = tmp_path_factory.mktemp("bucket-project")
    return make_project(work, bucket_params(mixed_folder(work.parent / f"{work.name}-data")))


@pytest.mark.slow
@pytest.mark.xdist_group("bucket_project")  # one worker builds the project once
def test_a_folder_of_mixed_aspects_trains_end_to_end(bucket_project: Path):
    data = read_json(bucket_project / "data/source/report.json")
    assert data["skipped"] == {B.SKIP_ASPECT: 1, B.SKIP_SMALL: 1}
    assert set(data["buckets"]["train"]) == {"48x80", "80x48", "64x64", "128x32"}
    cache = read_json(bucket_project / "data/cache/cache.json")
    assert sorted(cache["buckets"]) == sorted(data["buckets"]["train"])
    assert sum(len(v) for v in cache["buckets"].values()) == data["splits"]["train"]
    metrics = json.loads((bucket_project / "eval/metrics.json").read_text())
    assert metrics["fidelity"] == metrics["fidelity"]  # scored (not NaN)
    assert (bucket_project / "models/best").is_dir()


@pytest.mark.slow
@pytest.mark.xdist_group("bucket_project")  # one worker builds the project once
def test_sigkill_and_resume_with_buckets_is_bitwise_exact(bucket_project: Path, tmp_path: Path):
    assert_kill_and_resume_is_exact(bucket_project, tmp_path, "demo")


CLIENT = """
import sys, torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image
base, model, cond, out = sys.argv[1:]
controlnet = ControlNetModel.from_pretrained(model)
pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=controlnet, safety_checker=None)
image = Image.open(cond).convert("RGB")
w, h = image.size
result = pipe("a photo of a face", image=image, height=h, width=w, num_inference_steps=2,
              generator=torch.Generator().manual_seed(0)).images[0]
result.save(out)
assert not [m for m in sys.modules if m.startswith("controlnet_recipe")]
"""


@pytest.mark.slow
@pytest.mark.xdist_group("bucket_project")  # one worker builds the project once
def test_a_client_that_imports_nothing_of_ours_generates_at_a_bucket(bucket_project: Path, tmp_path: Path):
    cond = next(r for r in _rows(load_dataset_dir(bucket_project / "data/captions")) if r["bucket"] == "128x32")
    cond["conditioning_image"].save(tmp_path / "cond.png")
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    files = [str(tmp_path / "cond.png"), str(tmp_path / "out.png")]
    args = [sys.executable, str(script), "models/base/pipeline", "models/best", *files]
    run(args, bucket_project, PYTHONPATH="")
    assert Image.open(tmp_path / "out.png").size == (128, 32)


def test_the_tiny_sd3_positions_cover_auto_buckets_and_refuse_longer_ones():
    from controlnet_recipe.models import tiny
    from controlnet_recipe.stages.base import check_positions

    sd3 = tiny.build_sd3_transformer(64)
    check_positions(sd3, B.auto_buckets(64, 16, 4.0))  # up to 128 px sides: its table covers them
    with pytest.raises(BadInput, match="data.buckets: 160x32: the tiny SD3 base's position table covers sides up to 128 px"):
        check_positions(sd3, [(64, 64), (160, 32)])


def test_a_stated_bucket_off_the_bases_multiple_stops_in_one_line(params_file):
    from controlnet_recipe.models.families import recipe_buckets

    p = repo_params()
    p["demo"]["data"]["buckets"] = ["64x64", "50x64"]
    with pytest.raises(BadInput, match=r"^data.buckets: 50x64: expected sides that are multiples of 16"):
        recipe_buckets(load_config(params_file(p)).recipe)
