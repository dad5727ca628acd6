"""The data, conditions and captions stages on real-format data that the tests make: an image folder
full of bad files, a FaceSynthetics folder, a dataset in the hub's layout, a real photo with two
detections (scikit-image's astronaut), a tiny BLIP; and resuming an interrupted stage."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from controlnet_recipe.core import codedeps
from controlnet_recipe.core.config import load_config
from controlnet_recipe.core.storage import CAPTIONS_DIR, CONDITIONS_DIR, DATA_DIR, load_dataset_dir
from controlnet_recipe.faces.synthetic import make_face
from controlnet_recipe.stages.captions import build_captions
from controlnet_recipe.stages.conditions import build_conditions
from controlnet_recipe.stages.data import build_data
from controlnet_recipe.stages.photoreal import build_photoreal

from .conftest import repo_params


def _cfg(tmp: Path, data: dict, conditions: dict | None = None, captions: dict | None = None):
    p = repo_params()
    r = p["demo"]
    r["data"].update({"num_train": None, "num_validation": 1, "shard_size": 4, "min_size": 8, **data})
    r["conditions"].update(conditions or {})
    r["captions"].update(captions or {"captioner": "none"})
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return load_config(path)


def _run(cfg) -> tuple[dict, dict, dict]:
    data = build_data(cfg, cache_dir=Path("downloads"))
    build_photoreal(cfg)
    return data, build_conditions(cfg), build_captions(cfg)


def _face(seed: int, size: int = 48) -> Image.Image:
    return make_face(seed, size)[0]


@pytest.fixture
def bad_folder(tmp_path: Path, monkeypatch) -> Path:
    """An image folder with side captions and every kind of bad file."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        _face(i).save(folder / f"good{i}.png")
        (folder / f"good{i}.txt").write_text(f"face number {i}")
    good = io.BytesIO()
    _face(9).save(good, format="PNG")
    (folder / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all")
    Image.new("RGB", (1, 1)).save(folder / "tiny.png")
    _face(10).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.asarray(_face(11).convert("L"), dtype=np.uint16) * 257).save(folder / "deep16.png")
    _face(12).convert("L").save(folder / "gray.png")
    _face(13).convert("RGBA").save(folder / "rgba.png")
    return folder


def test_bad_files_are_skipped_or_converted_and_counted(bad_folder: Path):
    cfg = _cfg(
        bad_folder.parent, {"source": "imagefolder", "location": str(bad_folder)}, {"kind": "canny"}, {"captioner": "given"}
    )
    data, conditions, captions = _run(cfg)
    assert data["skipped"] == {"truncated": 1, "empty_file": 1, "not_an_image": 1, "too_small": 1}
    assert data["converted"] == {"CMYK": 1, "I;16": 1, "L": 1, "RGBA": 1}
    assert sum(data["splits"].values()) == 10  # 6 good + 4 converted
    assert sum(s["kept"] for s in conditions["splits"].values()) == 10
    ds = load_dataset_dir(CAPTIONS_DIR)
    rows = {i: c for part in ds.values() for i, c in zip(part["id"], part["caption"])}
    assert rows["good0.png"] == "face number 0" and rows["gray.png"] == ""
    assert all(img.mode == "RGB" for part in ds.values() for img in part["conditioning_image"])
    assert (DATA_DIR / "samples.png").is_file() and (CONDITIONS_DIR / "samples.png").is_file()


@pytest.fixture
def hostile_folder(bad_folder: Path) -> Path:
    """The bad files, plus side captions in other encodings or none, and broken symlinks."""
    captions = {
        "latin1": "a café face".encode("latin-1"),
        "utf16": "a face, 笑顔".encode("utf-16"),  # with a BOM
        "utf16le": "a grinning face".encode("utf-16-le"),  # without one
        "noise": bytes(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8)),
    }
    for i, (name, raw) in enumerate(captions.items()):
        _face(20 + i).save(bad_folder / f"{name}.png")
        (bad_folder / f"{name}.txt").write_bytes(raw)
    _face(30).save(bad_folder / "deadcaption.png")
    (bad_folder / "deadcaption.txt").symlink_to(bad_folder / "nowhere.txt")
    (bad_folder / "deadlink.png").symlink_to(bad_folder / "nowhere.png")
    return bad_folder


@pytest.mark.parametrize("undecodable", ["empty", "skip"])
def test_hostile_files_are_each_kept_or_counted(hostile_folder: Path, undecodable: str):
    data = {"source": "imagefolder", "location": str(hostile_folder), "undecodable_captions": undecodable}
    report, _, _ = _run(_cfg(hostile_folder.parent, data, {"kind": "canny"}, {"captioner": "given"}))
    listed = len([p for p in hostile_folder.iterdir() if p.suffix in (".png", ".jpg")])
    kept = sum(report["splits"].values())
    assert kept + sum(report["skipped"].values()) == listed
    assert report["skipped"]["broken_link"] == 1
    assert report["caption_encodings"]["cp1252"] == 1 and report["caption_encodings"]["utf-16"] == 1
    assert report["caption_encodings"]["utf-16-le"] == 1
    rows = {i: c for part in load_dataset_dir(CAPTIONS_DIR).values() for i, c in zip(part["id"], part["caption"])}
    assert rows["latin1.png"] == "a café face" and rows["utf16.png"] == "a face, 笑顔"
    assert rows["utf16le.png"] == "a grinning face"
    if undecodable == "empty":  # kept uncaptioned: the caption-dropout case
        assert rows["noise.png"] == "" and rows["deadcaption.png"] == ""
        assert report["caption_encodings"]["undecodable"] == 1 and report["caption_encodings"]["unreadable"] == 1
    else:
        assert "noise.png" not in rows and "deadcaption.png" not in rows
        assert report["skipped"]["undecodable_caption"] == 1 and report["skipped"]["unreadable_caption"] == 1


def test_filesystem_oddities_are_skipped_and_counted(tmp_path: Path, monkeypatch):
    """A symlink loop, a dangling link, a FIFO, a folder that cannot be listed and a file name in
    latin-1 bytes: the data stage keeps the good images and counts each of the others."""
    import os

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "images"
    (folder / "locked").mkdir(parents=True)
    for i in range(4):
        _face(i).save(folder / f"good{i}.png")
    _face(5).save(folder / "locked" / "hidden.png")
    (folder / "loop_a.png").symlink_to(folder / "loop_b.png")
    (folder / "loop_b.png").symlink_to(folder / "loop_a.png")
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    (folder / "linked_dir").symlink_to(folder)  # a link back to the root: followed once, not forever
    os.mkfifo(folder / "pipe.png")
    _face(6).save(os.fsencode(folder) + b"/caf\xe9.png")
    locked = str(folder / "locked")
    real_scandir = os.scandir

    def scandir(path):  # the tests run as root, who can list a chmod 000 folder: refuse it here
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report, _, _ = _run(_cfg(tmp_path, {"source": "imagefolder", "location": str(folder)}, {"kind": "canny"}))
    assert sum(report["splits"].values()) == 4
    assert report["skipped"] == {
        "symlink_loop": 2,
        "broken_link": 1,
        "special_file": 1,
        "unreadable_folder": 1,
        "name_not_utf8": 1,
    }


def test_facesynthetics_ground_truth_drops_bad_landmarks(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "fs"
    folder.mkdir()
    for i in range(5):
        img, lm, _ = make_face(i, 64)
        img.save(folder / f"{i:06d}.png")
        pts = np.vstack([lm, lm[36:42].mean(0), lm[42:48].mean(0)])  # 68 + two pupils
        lines = pts[:50] if i == 3 else pts  # sample 3: a landmark file with the wrong number of points
        (folder / f"{i:06d}_ldmks.txt").write_text("\n".join(f"{x} {y}" for x, y in lines))
    cfg = _cfg(
        tmp_path, {"source": "facesynthetics", "location": str(folder)}, {"kind": "face_segmentation", "detector": "ground_truth"}
    )
    data, conditions, _ = _run(cfg)
    assert sum(data["splits"].values()) == 5
    dropped = {k: v for s in conditions["splits"].values() for k, v in s["dropped"].items()}
    assert dropped == {"bad_landmarks": 1}
    ds = load_dataset_dir(CONDITIONS_DIR)
    assert "000003" not in [i for part in ds.values() for i in part["id"]]


def test_dlib_on_a_real_photo_two_detections_and_no_face(tmp_path: Path, monkeypatch):
    from skimage.data import astronaut

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(astronaut()).save(folder / "astronaut.png")
    Image.new("RGB", (128, 128), (90, 120, 200)).save(folder / "sky.png")
    cfg = _cfg(tmp_path, {"source": "imagefolder", "location": str(folder)}, {"kind": "face_segmentation", "detector": "dlib"})
    _, conditions, _ = _run(cfg)
    dropped = {k: v for s in conditions["splits"].values() for k, v in s["dropped"].items()}
    assert dropped == {"no_face": 1}
    (row,) = [r for part in load_dataset_dir(CONDITIONS_DIR).values() for r in part]
    # dlib finds two: the astronaut's face and the round mission patch on her suit (a false positive).
    assert len(row["landmarks"]) == 2 and all(np.asarray(f).shape == (68, 2) for f in row["landmarks"])
    seg = np.asarray(row["conditioning_image"])
    assert seg.shape == (512, 512, 3) and (seg[76:166, 175:265].sum(-1) > 0).mean() > 0.5


def test_hub_layout_with_given_conditions_and_captions(tmp_path: Path, monkeypatch):
    """The source recipe's ready-made dataset layout: image, spiga_seg, image_caption."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    monkeypatch.chdir(tmp_path)
    faces = [make_face(i, 48) for i in range(6)]
    from controlnet_recipe.faces.draw import draw_segmentation

    ds = Dataset.from_dict(
        {
            "image": [f[0] for f in faces],
            "spiga_seg": [draw_segmentation([f[1]], (48, 48)) for f in faces],
            "image_caption": [f"caption {i}" for i in range(6)],
        }
    ).cast_column("image", ImageFeature())
    ds = ds.cast_column("spiga_seg", ImageFeature())
    (tmp_path / "hub/data").mkdir(parents=True)
    ds.to_parquet(tmp_path / "hub/data/train-00000-of-00001.parquet")
    mapping = {"image": "image", "spiga_seg": "conditioning_image", "image_caption": "caption"}
    cfg = _cfg(
        tmp_path,
        {"source": "hub", "location": str(tmp_path / "hub"), "source_columns": mapping},
        {"kind": "given"},
        {"captioner": "given", "prefix": "photo: "},
    )
    _run(cfg)
    out = load_dataset_dir(CAPTIONS_DIR)
    rows = [r for part in out.values() for r in part]
    assert len(rows) == 6 and all(r["caption"].startswith("photo: caption ") for r in rows)
    assert all(np.asarray(r["conditioning_image"]).max() > 0 for r in rows)


def test_blip_captions_through_the_stage(bad_folder: Path, tiny_blip: Path):
    cfg = _cfg(
        bad_folder.parent,
        {"source": "imagefolder", "location": str(bad_folder)},
        {"kind": "canny"},
        {"captioner": "blip", "model": str(tiny_blip), "batch_size": 3, "suffix": "!"},
    )
    _, _, captions = _run(cfg)
    assert captions["captioner"] == "blip" and sum(captions["splits"].values()) == 10
    texts = [t for part in load_dataset_dir(CAPTIONS_DIR).values() for t in part["caption"]]
    assert all(isinstance(t, str) for t in texts)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", ["data", "conditions", "captions"])
def test_a_killed_stage_resumes_to_the_same_bytes(bad_folder: Path, tmp_path: Path, monkeypatch, stage: str):
    """Each sharded stage killed after its first shard, then rerun: every file it writes (the
    shards, the preview) and its report are those of a run that was never interrupted."""
    from controlnet_recipe.core import storage
    from controlnet_recipe.stages import captions, conditions

    writers = (storage, captions, conditions)  # the stages that write shards from their worker processes

    cfg = _cfg(bad_folder.parent, {"source": "imagefolder", "location": str(bad_folder)}, {"kind": "canny"})
    clean = _run(cfg)
    clean_tree = _tree(Path("data"))
    shutil.rmtree("data")
    real_write = storage.write_shard
    written = []

    def killed(root, split, index, ds, stats=None):
        if root.name == {"data": "source"}.get(stage, stage):
            if written:
                raise KeyboardInterrupt("killed mid-stage")
            written.append(index)
        return real_write(root, split, index, ds, stats)

    for module in writers:
        monkeypatch.setattr(module, "write_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg)
    for module in writers:
        monkeypatch.setattr(module, "write_shard", real_write)
    resumed = _run(cfg)
    assert resumed == clean
    assert _tree(Path("data")).keys() == clean_tree.keys()
    different = [k for k, v in _tree(Path("data")).items() if v != clean_tree[k]]
    assert different == []


def test_interrupted_stage_resumes_without_redoing_shards(bad_folder: Path, monkeypatch):
    cfg = _cfg(bad_folder.parent, {"source": "imagefolder", "location": str(bad_folder)}, {"kind": "canny"})
    build_data(cfg, cache_dir=Path("downloads"))
    shards = sorted((DATA_DIR / "train").iterdir())
    assert len(shards) >= 2
    first_mtime = shards[0].stat().st_mtime_ns
    # A crash before the end: the last shard and the completion marker are gone.
    shutil.rmtree(shards[-1])
    (DATA_DIR / "splits.json").unlink()
    with pytest.raises(FileNotFoundError, match="run the stage that writes it first"):
        load_dataset_dir(DATA_DIR)
    report = build_data(cfg, cache_dir=Path("downloads"))
    assert shards[0].stat().st_mtime_ns == first_mtime and shards[-1].is_dir()
    assert sum(report["splits"].values()) == 10
    # Other params: everything is redone.
    cfg2 = _cfg(bad_folder.parent, {"source": "imagefolder", "location": str(bad_folder), "min_size": 40}, {"kind": "canny"})
    report = build_data(cfg2, cache_dir=Path("downloads"))
    assert report["skipped"]["too_small"] >= 1 and shards[0].stat().st_mtime_ns != first_mtime
    assert json.loads((DATA_DIR / "splits.json").read_text())
    # Same params, other code (DVC reruns a stage whose code changed): redone too, never resumed.
    second_mtime = shards[0].stat().st_mtime_ns
    build_data(cfg2, cache_dir=Path("downloads"))
    assert shards[0].stat().st_mtime_ns == second_mtime
    monkeypatch.setattr(codedeps, "stage_code_digest", lambda stage: "edited code")
    build_data(cfg2, cache_dir=Path("downloads"))
    assert shards[0].stat().st_mtime_ns != second_mtime
