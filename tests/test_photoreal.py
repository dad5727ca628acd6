"""The photoreal stage (img2img before conditions) runs for real on the tiny Stable Diffusion pipeline
that the base stage saved, loaded through the same from_pretrained path as a hub model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from controlnet_recipe.core import storage
from controlnet_recipe.core.config import load_config
from controlnet_recipe.core.storage import PHOTOREAL_DIR, load_dataset_dir
from controlnet_recipe.stages.photoreal import build_photoreal


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_img2img_changes_images_and_keeps_everything_else(project: Path, tmp_path: Path, monkeypatch):
    work = tmp_path / "p"
    shutil.copytree(project, work, symlinks=True)
    monkeypatch.chdir(work)
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["demo"]["photoreal"].update(
        enabled=True, model="models/base/pipeline", strength=0.6, num_inference_steps=4, guidance_scale=2.0, batch_size=4
    )
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cfg = load_config("params.yaml")
    assert build_photoreal(cfg)["enabled"] is True
    before, after = load_dataset_dir(Path("data/source")), load_dataset_dir(PHOTOREAL_DIR)
    assert {s: len(d) for s, d in before.items()} == {s: len(d) for s, d in after.items()}
    a, b = before["train"][0], after["train"][0]
    assert a["id"] == b["id"] and a["landmarks"] == b["landmarks"]
    assert a["image"].size == b["image"].size and not np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert (PHOTOREAL_DIR / "samples.png").is_file()
    # Killed after its first shard and rerun: the same bytes, preview included.
    clean = _tree(PHOTOREAL_DIR)
    shutil.rmtree(PHOTOREAL_DIR)
    real_write, written = storage.write_shard, []

    def killed(root, split, index, ds, stats=None):
        if written:
            raise KeyboardInterrupt("killed mid-stage")
        written.append((split, index))
        return real_write(root, split, index, ds, stats)

    monkeypatch.setattr(storage, "write_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        build_photoreal(cfg)
    monkeypatch.setattr(storage, "write_shard", real_write)
    build_photoreal(cfg)
    assert _tree(PHOTOREAL_DIR) == clean
    # Turned off again: a pointer to data/source, nothing copied.
    params["demo"]["photoreal"]["enabled"] = False
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    build_photoreal(load_config("params.yaml"))
    assert sorted(p.name for p in PHOTOREAL_DIR.iterdir()) == ["passthrough.json"]
    assert len(load_dataset_dir(PHOTOREAL_DIR)["train"]) == len(before["train"])
