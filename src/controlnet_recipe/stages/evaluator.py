"""evaluator stage: the models the evaluation scores images with.

- a small segmentation network trained on the training pairs (image -> condition map), which also
  scores validation during training (val/miou);
- a landmark re-detector: a heatmap network trained on the pairs (``landmarks: learned``), or dlib;
- CLIP: a pretrained model checked against its sha256 (``clip_model``), or a small CLIP trained
  on the (image, caption) pairs.

Their scores on real held-out images are the evaluation's ceiling (computed by evaluate).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config, EvaluatorCfg
from ..faces.draw import PARTS
from ..fit import fit
from ..images import images_to_tensor
from ..metrics.clip import verify_weights
from ..metrics.segmentation import confusion, face_miou, labels_tensor, segment
from ..models.landmark_net import train_landmark_net
from ..models.segmenter import CLIP_REF, LANDMARKS, SEGMENTER, Segmenter, degrade
from ..models.tiny_clip import train_clip
from ..storage import CAPTIONS_DIR, EVALUATOR_DIR, fresh_dir, load_dataset_dir, seed_everything, write_json


def train_segmenter(pixels: torch.Tensor, labels: torch.Tensor, cfg: EvaluatorCfg, seed: int) -> Segmenter:
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    steps, batch_size, lr = cfg.steps, cfg.batch_size, cfg.learning_rate
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Segmenter(len(PARTS), width=cfg.width).to(device)
    # Small parts (eyes, lips) matter as much as skin: weight classes by inverse sqrt frequency.
    freq = torch.bincount(labels.ravel(), minlength=len(PARTS)).float() + 1
    weight = (freq.sum() / freq).sqrt()
    weight = (weight / weight.mean()).to(device)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(pixels), (batch_size,), generator=g)
        x = degrade(pixels[idx], g).to(device)
        return F.cross_entropy(model(x), labels[idx].to(device), weight=weight)

    fit(model, loss_fn, steps=steps, lr=lr, desc="evaluator: segmenter")
    return model.cpu().eval()


def main(cfg: Config) -> None:
    r, ev, cols = cfg.recipe, cfg.recipe.evaluator, cfg.recipe.columns
    ds = load_dataset_dir(CAPTIONS_DIR)
    res = r.data.resolution
    train, val = ds["train"], ds["validation"]
    train = train.select(range(min(ev.num_samples, len(train))))
    pixels = images_to_tensor(train[cols.image], res)
    out = fresh_dir(EVALUATOR_DIR)
    report: dict = {"landmarks": ev.landmarks}
    if r.conditions.kind != "canny":
        model = train_segmenter(pixels, labels_tensor(train[cols.conditioning_image], res), ev, seed=r.data.seed)
        pred = segment(model, images_to_tensor(val[cols.image], res))
        miou, per_part = face_miou(confusion(pred, labels_tensor(val[cols.conditioning_image], res).numpy()))
        model.save(out / SEGMENTER)
        report.update(miou_on_real_validation=miou, per_part=per_part)
        print(f"evaluator: segmenter mIoU on real validation images {miou:.3f}")
    if r.conditions.kind == "face_segmentation" and ev.landmarks == "learned":
        keep = [i for i, faces in enumerate(train["landmarks"]) if faces]
        targets = torch.tensor(np.array([train["landmarks"][i][0] for i in keep], dtype=np.float32))
        width = train[cols.image][0].width if len(train) else res
        net = train_landmark_net(
            pixels[keep], targets * (res / width), ev.landmark_steps, ev.batch_size, ev.learning_rate, ev.width, r.data.seed
        )
        net.save(out / LANDMARKS)
    if ev.clip_model is None:
        captions = list(train[cols.caption])
        words = sorted({w for c in captions for w in c.replace(",", " ").split()})
        train_clip(out / "clip", pixels, captions, words, ev.clip_steps, 64, r.data.seed)
        ref = {"name_or_path": str(out / "clip"), "revision": None}
    else:
        ref = {"name_or_path": ev.clip_model, "revision": ev.clip_revision}
    ref["sha256"] = verify_weights(ref["name_or_path"], ref["revision"], ev.clip_sha256)
    write_json(out / CLIP_REF, ref)
    write_json(out / "report.json", report)
    print(f"evaluator: CLIP {ref['name_or_path']} (sha256 {ref['sha256'][:12]}) -> {out}")
