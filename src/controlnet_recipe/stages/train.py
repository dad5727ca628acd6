"""train stage: the ControlNet, trained by ``training.Trainer`` on the latent cache with the
memory tier's settings, and saved in diffusers format (``ControlNetModel.from_pretrained``).

This module is wiring: the tier (checked against the base's family; ``gpu: auto`` fitted by the
planner on a GPU), a relaunch under ``accelerate launch`` when the tier needs several processes,
then the trainer, and the summary (``models/adapter/training.json``, ``train/metrics.json``).
Checkpoints, resume and validation are the trainer's components (``training/``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import PartialState

from ..adapters import check as check_adapter
from ..core.config import Config, ConfigError, Tier, check_tier, resolve_tier
from ..core.storage import ADAPTER_DIR, BASE_DIR, TRAIN_DIR, write_json
from ..models.base_model import BASE_FILE, BaseRef
from ..training.launch import relaunch
from ..training.trainer import Trainer


def tier_for(cfg: Config, ref: BaseRef) -> tuple[str, Tier]:
    """The tier, checked against the base's family (with ``family: auto``, known only once the base
    stage has read the model's index) before any model loads. ``gpu: auto`` on a GPU: the planner's
    fit for this run and the card's free memory (planning/fit.py), said with its reasons."""
    check_tier(cfg.gpu, ref.family, cfg.tiers, f"{BASE_DIR / BASE_FILE} (family {ref.family})")
    check_adapter(cfg.recipe.adapter, ref.family, f"{cfg.recipe_name}.adapter")
    if cfg.gpu == "auto" and torch.cuda.is_available():
        from ..planning.fit import detect_and_fit
        from ..planning.plan import architecture

        try:
            arch = architecture(ref.name_or_path)
        except ConfigError as e:
            name = resolve_tier(cfg.gpu, ref.family, cfg.tiers)
            print(f"train: gpu: auto: {e}; tier {name} from the card's size")
            return name, cfg.tiers[name]
        tier, why = detect_and_fit(cfg.recipe, arch, cfg.tiers)
        print(f"train: gpu: auto: {why}")
        return "auto", tier
    name = resolve_tier(cfg.gpu, ref.family, cfg.tiers)
    return name, cfg.tiers[name]


def train_controlnet(cfg: Config, *, train_dir: Path = TRAIN_DIR, out_dir: Path = ADAPTER_DIR) -> dict:
    """Train, checkpoint, validate and save the ControlNet; its summary."""
    trainer = Trainer(cfg, *tier_for(cfg, BaseRef.read()), train_dir=train_dir)
    trainer.run()
    return trainer.finish(out_dir)


def main(cfg: Config) -> None:
    _, tier = tier_for(cfg, BaseRef.read())
    if relaunch(tier, sys.argv[1:]):  # several GPUs or machines, or DeepSpeed: under accelerate launch
        return
    summary = train_controlnet(cfg)
    if PartialState().is_main_process:
        write_json(ADAPTER_DIR / "training.json", summary)
        write_json(TRAIN_DIR / "metrics.json", summary)
        print(f"train: {summary} -> {ADAPTER_DIR}")
