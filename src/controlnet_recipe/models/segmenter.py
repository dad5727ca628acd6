"""A small U-Net, image -> per-pixel outputs: the condition extractor's network (class logits
for categorical and binary maps, values for continuous ones; ``conditions/extractor.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLIP_REF = "clip.json"  # the evaluator stage's CLIP, in models/evaluator: {name_or_path, revision, sha256}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(4, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(4, cout),
        nn.SiLU(),
    )


class Segmenter(nn.Module):
    """A three-level U-Net: (N, 3, H, W) in [-1, 1] -> (N, num_classes, H, W) outputs."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        w = width
        self.config = {"num_classes": num_classes, "width": width}
        self.enc1, self.enc2, self.enc3 = _block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.dec2, self.dec1 = _block(6 * w, 2 * w), _block(3 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.avg_pool2d(e1, 2))
        e3 = self.enc3(F.avg_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.head(d1)

    def save(self, path) -> None:
        torch.save({"config": self.config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path) -> Segmenter:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()


def degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour jitter, so the evaluator also reads soft, generated-looking images.
    Each image gets its own Gaussian blur (sigma up to 1.2; none below 0.2), applied to the whole
    batch at once as a separable grouped convolution."""
    n, c = x.shape[:2]
    sigma = torch.rand(n, generator=generator) * 1.2
    k = torch.arange(-2, 3, dtype=x.dtype)
    w = torch.exp(-(k**2) / (2 * sigma.clamp(min=0.2)[:, None].to(x.dtype) ** 2))
    w = torch.where((sigma > 0.2)[:, None], w / w.sum(1, keepdim=True), (k == 0).to(x.dtype))  # no blur: identity
    w = w.repeat_interleave(c, 0)  # one kernel per (image, channel)
    flat = x.reshape(1, n * c, *x.shape[2:])
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), w.view(n * c, 1, 1, 5), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), w.view(n * c, 1, 5, 1), groups=n * c)
    x = flat.view_as(x)
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.3
    x = x * gain + torch.randn(x.shape, generator=generator) * 0.05
    return x.clamp(-1, 1)
