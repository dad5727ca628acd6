"""evaluator stage: the models the evaluation scores images with.

- the condition extractor, learned on the training pairs (image -> condition map) whatever the
  condition: a segmenter for categorical maps, a line finder for binary ones, a regressor for
  continuous ones (``conditions/maps.py``). It also scores validation during training;
- the condition kind's own models (faces: a landmark re-detector, learned or dlib);
- CLIP: a pretrained model checked against its sha256 (``clip_model``), or a small CLIP trained
  on the (image, caption) pairs.

Their scores on real held-out images are the evaluation's ceiling (computed by evaluate).
"""

from __future__ import annotations

import numpy as np

from ..conditions import condition
from ..conditions.extractor import train_extractor
from ..core.config import Config
from ..core.images import images_to_tensor
from ..core.storage import CAPTIONS_DIR, EVALUATOR_DIR, fresh_dir, load_dataset_dir, write_json
from ..metrics.clip import verify_weights
from ..models.segmenter import CLIP_REF
from ..models.tiny_clip import train_clip


def main(cfg: Config) -> None:
    r, ev, cols = cfg.recipe, cfg.recipe.evaluator, cfg.recipe.columns
    cond = condition(r.conditions)
    ds = load_dataset_dir(CAPTIONS_DIR)
    res = r.data.resolution
    train, val = ds["train"], ds["validation"]
    train = train.select(range(min(ev.num_samples, len(train))))
    pixels = images_to_tensor(train[cols.image], res)
    out = fresh_dir(EVALUATOR_DIR)
    map_type = cond.map_type(train[cols.conditioning_image], res)
    print(f"evaluator: {map_type.why}")
    extractor = train_extractor(pixels, train[cols.conditioning_image], map_type, ev, seed=r.data.seed)
    extractor.save(out)
    real = extractor.scores(val[cols.image], val[cols.conditioning_image])
    on_real = {k: float(np.nanmean(v)) for k, v in real.items()}
    report: dict = {
        "condition": cond.report(),
        "map_type": map_type.kind,
        "why": map_type.why,
        "extractor_on_real_validation": on_real,
    }
    print(f"evaluator: extractor on real validation images: {', '.join(f'{k} {v:.3f}' for k, v in on_real.items())}")
    report.update(cond.train_models(train, pixels, out, ev, r))
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
