"""Experiment trackers behind one small interface: DVCLive (for ``dvc plots``), TensorBoard, and
Weights & Biases (offline unless WANDB_MODE says otherwise). Only the main process logs."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image


class Trackers:
    def __init__(self, names: list[str], folder: Path, project: str, config: dict, resume: bool):
        self.folder = folder
        self._live = self._tb = self._wandb = None
        if "dvclive" in names:
            self._live = _dvclive(folder / "live", resume)
            self._live.log_params(config)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(folder / "tensorboard"))
        if "wandb" in names:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb.init(project=project, config=config, dir=str(folder), resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._live:
            self._live.step = step
            for k, v in metrics.items():
                self._live.log_metric(k, v)
        if self._tb:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb:
            self._wandb.log(metrics, step=step)

    def log_image(self, name: str, image: Image.Image, step: int) -> None:
        if self._live:
            self._live.log_image(f"{name}/{step:07d}.png", image)
        if self._tb:
            import numpy as np

            self._tb.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self._wandb:
            import wandb

            self._wandb.log({name: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self._live:
            self._live.end()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


def _dvclive(folder: Path, resume: bool):
    """DVCLive's logger. In a git repository with no commit yet (a fresh ``git init``), DVCLive 3
    reads HEAD before it checks for commits and fails; then it logs the same files without its
    DVC experiment bookkeeping, and says so in one line, rather than ending the run."""
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    kw = dict(dir=str(folder), resume=resume, dvcyaml=None, save_dvc_exp=False, report=None)
    try:
        return Live(**kw)
    except SCMError as e:

        class FilesOnly(Live):
            def _init_dvc(self) -> None:  # what Live needs of it when no DVC experiment is kept
                self._dvc_file = self._init_dvc_file()

        print(f"train: dvclive: {e} (no commit yet?); logging to {folder} without DVC experiment tracking")
        return FilesOnly(**kw)
