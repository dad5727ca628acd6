"""The trackers named in train.report_to write what people look at: DVCLive plots, TensorBoard
events, an offline wandb run."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from controlnet_recipe.training.tracking import Trackers


def test_all_trackers_log_metrics_and_images(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    t = Trackers(["dvclive", "tensorboard", "wandb"], tmp_path / "train", "test", {"lr": 1e-5}, resume=False)
    for step in (10, 20):
        t.log({"loss": 1.0 / step, "val/miou": step / 100}, step)
    t.log_image("validation", Image.new("RGB", (8, 8), (255, 0, 0)), 20)
    t.close()
    loss = (tmp_path / "train/live/plots/metrics/loss.tsv").read_text().splitlines()
    assert loss[0].split("\t")[:2] == ["step", "loss"] and len(loss) == 3
    assert (tmp_path / "train/live/plots/metrics/val/miou.tsv").is_file()
    assert (tmp_path / "train/live/plots/images/validation/0000020.png").is_file()
    assert list((tmp_path / "train/tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "train/wandb").glob("offline-run-*/run-*.wandb"))


def test_resume_continues_dvclive_curves(tmp_path: Path):
    folder = tmp_path / "train"
    first = Trackers(["dvclive"], folder, "p", {}, resume=False)
    first.log({"loss": 0.5}, 10)
    first.close()
    again = Trackers(["dvclive"], folder, "p", {}, resume=True)
    again.log({"loss": 0.4}, 20)
    again.close()
    rows = (folder / "live/plots/metrics/loss.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[0] for r in rows] == ["10", "20"]


def test_dvclive_logs_in_a_git_repo_without_commits(tmp_path: Path, monkeypatch, capsys):
    """`git init` and no commit yet: DVCLive alone raises 'Empty git repo'; the run still logs."""
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    t = Trackers(["dvclive"], tmp_path / "train", "p", {}, resume=False)
    t.log({"loss": 0.5}, 10)
    t.close()
    assert "without DVC experiment tracking" in capsys.readouterr().out
    rows = (tmp_path / "train/live/plots/metrics/loss.tsv").read_text().splitlines()
    assert rows[1].split("\t")[:2] == ["10", "0.5"]
