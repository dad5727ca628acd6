"""Metric curves for the evaluation report."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "miou": "condition mIoU (redrawn landmarks)",
    "nme": "landmark NME (lower is better)",
    "found": "face detected",
    "edge_f1": "edge F1 (Canny on the image)",
    "reextracted_ssim": "SSIM (re-extracted by a model)",
    "reextracted_rmse": "RMSE (re-extracted by a model; lower is better)",
    "reextracted_miou": "mIoU (re-extracted by a model)",
    "extractor_miou": "mIoU (learned extractor)",
    "extractor_f1": "line F1 (learned extractor)",
    "extractor_ssim": "SSIM (learned extractor)",
    "extractor_rmse": "RMSE (learned extractor; lower is better)",
    "clip_score": "CLIP score",
    "concept_survival": "probe concept survival",
    "face_rate": "probes showing a face",
    "forgetting": "forgetting (survival lost vs base)",
}


def plot_sweep(rows: list[dict], base: dict, fidelity: str, chosen: int, path: Path, model: str = "ControlNet") -> Path:
    """One panel per metric against the training step; the base model as a dashed line and the
    chosen checkpoint marked."""
    keys = [k for k in LABELS if k in rows[0]]
    cols = 3
    fig, axes = plt.subplots(
        (len(keys) + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((len(keys) + cols - 1) // cols)), squeeze=False
    )
    steps = [r["step"] for r in rows]
    for ax, k in zip(axes.flat, keys):
        ax.plot(steps, [r[k] for r in rows], "o-", color="tab:blue", label=model)
        if k in base:
            ax.axhline(base[k], ls="--", color="tab:gray", label="base alone")
        ax.axvline(chosen, ls=":", color="tab:red", label="chosen")
        ax.set_title(LABELS[k] + (" *" if k == fidelity else ""), fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Checkpoint sweep (* the fidelity metric the rule uses)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
