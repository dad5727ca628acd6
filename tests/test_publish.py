"""push_to_hub uploads the final ControlNet and a model card, never checkpoints or optimizer state."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from controlnet_recipe.apps.publish import push_to_hub
from controlnet_recipe.core.config import load_config


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded."""

    def __init__(self):
        self.calls, self.files = [], {}

    def create_repo(self, repo_id, exist_ok):
        self.calls.append(("create_repo", repo_id))

    def upload_folder(self, repo_id, folder_path, commit_message):
        self.calls.append(("upload_folder", repo_id))
        self.files = {p.name: p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}


@pytest.mark.slow
def test_push_uploads_model_and_card_only(project: Path, tmp_path: Path, monkeypatch):
    work = tmp_path / "p"
    shutil.copytree(project, work, symlinks=True)
    assert any((work / "train/checkpoints").iterdir())  # there is optimizer state that must stay home
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["demo"]["evaluate"].update(push_to_hub=True, hub_model_id="someone/face-controlnet")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(work)
    api = RecordingApi()
    files = push_to_hub(load_config("params.yaml"), api=api)
    assert api.calls == [("create_repo", "someone/face-controlnet"), ("upload_folder", "someone/face-controlnet")]
    assert set(files) == set(api.files)
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "evaluation_grid.png"} <= set(files)
    assert not [f for f in files if "optimizer" in f or "checkpoint" in f or f.endswith((".bin", ".pkl"))]
    card = api.files["README.md"].decode()
    assert "base_model: models/base/pipeline" in card and "miou" in card and "learning_rate" in card
    assert "token" not in card.lower()
