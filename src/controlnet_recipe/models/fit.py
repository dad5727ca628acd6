"""The one loop that trains the helper models: the tiny base's VAE and UNet, the evaluator's
segmenter and landmark network, and the tiny CLIP. Each caller hands it a ``loss_fn(step)`` that
draws its own batch; the loop owns the optimizer, the schedule, clipping, EMA and the progress bar.
(The ControlNet itself trains in training/trainer.py, through accelerate.)"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..core.logs import progress


def lr_at(step: int, *, steps: int, lr: float, warmup: int = 0, cosine: bool = True) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine decay to zero at ``steps`` (or constant)."""
    scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
    decay = 0.5 * (1 + math.cos(math.pi * step / steps)) if cosine else 1.0
    return lr * scale * decay


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    desc: str,
    warmup: int = 0,
    cosine: bool = True,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = None,
    ema=None,
    smooth: int = 20,
) -> list[float]:
    """AdamW on ``model`` for ``steps`` steps of ``loss_fn(step)``; returns the losses. ``ema``
    (diffusers' EMAModel over the same parameters) is stepped after every optimizer step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    for step in (bar := progress(range(steps), desc=desc)):
        loss = loss_fn(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps=steps, lr=lr, warmup=warmup, cosine=cosine)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-smooth:]):.4f}", refresh=False)  # shown at the next redraw
    return losses
