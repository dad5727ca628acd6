"""A landmark re-detector for the embedded default: the segmenter's U-Net with one heatmap per
iBUG point, read out by a soft-argmax (integral regression), so it is trained with a plain L1 loss
on coordinates. On real photos the evaluation uses dlib instead."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..faces.draw import NUM_LANDMARKS
from .fit import fit
from .segmenter import Segmenter, degrade


class LandmarkNet(Segmenter):
    """(N, 3, H, W) in [-1, 1] -> (N, 68, 2) landmarks in pixels (x, y)."""

    def __init__(self, num_classes: int = NUM_LANDMARKS, width: int = 8):
        super().__init__(num_classes, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        n, k, h, w = logits.shape
        prob = logits.flatten(2).softmax(-1).view(n, k, h, w)
        xs = torch.arange(w, dtype=prob.dtype, device=prob.device) + 0.5
        ys = torch.arange(h, dtype=prob.dtype, device=prob.device) + 0.5
        return torch.stack([(prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)], -1)

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        return np.concatenate([self(pixels[i : i + batch_size]).numpy() for i in range(0, len(pixels), batch_size)])


def train_landmark_net(
    pixels: torch.Tensor, landmarks: torch.Tensor, steps: int, batch_size: int, lr: float, width: int, seed: int
) -> LandmarkNet:
    """Fit on (image, 68 points) pairs, with the segmenter's blur/noise/colour augmentation."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LandmarkNet(width=width).to(device)
    scale = pixels.shape[-1]

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(pixels), (batch_size,), generator=g)
        x = degrade(pixels[idx], g).to(device)
        return F.l1_loss(model(x) / scale, landmarks[idx].to(device) / scale)

    fit(model, loss_fn, steps=steps, lr=lr, desc="evaluator: landmarks")
    return model.cpu().eval()
