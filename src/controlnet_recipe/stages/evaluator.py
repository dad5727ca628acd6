"""evaluator stage: train the condition re-extractor that the evaluate stage scores images with.

For the face-segmentation condition it is a small segmentation network trained on the training
pairs (image -> condition map). Its score on real held-out images is the evaluation's ceiling.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import Config, EvaluatorCfg
from ..faces.draw import PARTS
from ..metrics.segmentation import confusion, face_miou, labels_tensor, segment
from ..models.segmenter import Segmenter, degrade
from ..storage import CONDITIONS_DIR, EVALUATOR_DIR, fresh_dir, images_to_tensor, load_dataset_dir, seed_everything, write_json

WEIGHTS = "segmenter.pt"


def train_segmenter(pixels: torch.Tensor, labels: torch.Tensor, cfg: EvaluatorCfg, seed: int) -> Segmenter:
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    steps, batch_size, lr = cfg.steps, cfg.batch_size, cfg.learning_rate
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Segmenter(len(PARTS), width=cfg.width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    # Small parts (eyes, lips) matter as much as skin: weight classes by inverse sqrt frequency.
    freq = torch.bincount(labels.ravel(), minlength=len(PARTS)).float() + 1
    weight = (freq.sum() / freq).sqrt()
    weight = (weight / weight.mean()).to(device)
    for step in (bar := tqdm(range(steps), desc="evaluator: segmenter")):
        idx = torch.randint(0, len(pixels), (batch_size,), generator=g)
        x = degrade(pixels[idx], g).to(device)
        loss = F.cross_entropy(model(x), labels[idx].to(device), weight=weight)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.cpu().eval()


def main(cfg: Config) -> None:
    r = cfg.recipe
    ds = load_dataset_dir(CONDITIONS_DIR)
    res = r.data.resolution
    train, val = ds["train"], ds["validation"]
    train = train.select(range(min(r.evaluator.num_samples, len(train))))
    model = train_segmenter(
        images_to_tensor(train[r.columns.image], res),
        labels_tensor(train[r.columns.conditioning_image], res),
        r.evaluator,
        seed=r.data.seed,
    )
    pred = segment(model, images_to_tensor(val[r.columns.image], res))
    miou, per_part = face_miou(confusion(pred, labels_tensor(val[r.columns.conditioning_image], res).numpy()))
    out = fresh_dir(EVALUATOR_DIR)
    model.save(out / WEIGHTS)
    write_json(out / "report.json", {"kind": r.evaluator.kind, "miou_on_real_validation": miou, "per_part": per_part})
    print(f"evaluator: segmenter mIoU on real validation images {miou:.3f} -> {out}")
