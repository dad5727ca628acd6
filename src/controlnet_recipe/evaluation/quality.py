"""Image quality against held-out real images: FID and KID (torchmetrics), on the features of the
evaluation's CLIP image encoder (FID on CLIP features, as Kynkäänniemi et al. 2023 recommend)."""

from __future__ import annotations

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


def fid_kid(real: torch.Tensor, fake: torch.Tensor, features: torch.nn.Module, seed: int = 0) -> dict[str, float]:
    """FID, and KID mean and std over subsets (subsets of half the smaller set), of uint8 (N, 3, H, W) images."""
    n = min(len(real), len(fake))
    torch.manual_seed(seed)  # KID draws its subsets with torch's global generator
    fid = FrechetInceptionDistance(feature=features, normalize=False)
    kid = KernelInceptionDistance(feature=features, normalize=False, subsets=50, subset_size=max(2, n // 2))
    for m in (fid, kid):
        m.update(real, real=True)
        m.update(fake, real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
