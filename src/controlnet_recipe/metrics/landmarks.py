"""Landmark fidelity: the normalised mean error (NME) of re-detected landmarks against the ones
that drew the condition, per face region, and the segmentation redrawn from them."""

from __future__ import annotations

import numpy as np

from ..faces.draw import draw_label_map, face_scale
from .segmentation import confusion, face_miou

REGIONS = {
    "jaw": list(range(0, 17)),
    "brows": list(range(17, 27)),
    "nose": list(range(27, 36)),
    "eyes": list(range(36, 48)),
    "mouth": list(range(48, 68)),
}


def nme(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean point error divided by the target's inter-ocular distance (outer eye corners): overall
    (``all``) and per region."""
    err = np.linalg.norm(pred - target, axis=-1) / max(face_scale(target), 1e-6)
    return {"all": float(err.mean()), **{name: float(err[idx].mean()) for name, idx in REGIONS.items()}}


def landmark_fidelity(
    detected: list[np.ndarray | None], targets: list[np.ndarray], size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Per image: NME overall and per region (NaN where no face was found), ``found`` (0/1), and the
    mIoU between the segmentation redrawn from the detected landmarks and the one drawn from the
    targets (a missed face redraws as all background, so it scores 0)."""
    out: dict[str, list[float]] = {k: [] for k in ("nme", *[f"nme_{r}" for r in REGIONS], "found", "miou")}
    for pred, target in zip(detected, targets):
        truth = draw_label_map([target], size)
        if pred is None:
            for k in out:
                out[k].append(np.nan if k.startswith("nme") else 0.0)
            continue
        e = nme(pred, target)
        out["nme"].append(e["all"])
        for r in REGIONS:
            out[f"nme_{r}"].append(e[r])
        out["found"].append(1.0)
        out["miou"].append(face_miou(confusion(draw_label_map([pred], size), truth))[0])
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
