"""Forgetting probes: off-domain prompts over a few conditions. Does the prompt's concept survive
the ControlNet (CLIP zero-shot among all probe concepts), and (face conditions) does a face appear
anyway?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.config import Probe
from ..metrics.clip import to_uint8

PROBE_SEED_OFFSET = 100_000


@dataclass
class ProbeSet:
    prompts: list[str]
    conditions: list
    seeds: list[int]
    truth: np.ndarray  # index of each image's concept in ``labels``
    labels: list[str]

    @classmethod
    def build(cls, probes: list[Probe], conditions: list, seed: int) -> ProbeSet:
        labels = list(dict.fromkeys(p.concept or p.prompt for p in probes))
        prompts, conds, truth = [], [], []
        for p in probes:
            for c in conditions:
                prompts.append(p.prompt)
                conds.append(c)
                truth.append(labels.index(p.concept or p.prompt))
        seeds = [seed + PROBE_SEED_OFFSET + i for i in range(len(prompts))]
        return cls(prompts, conds, seeds, np.array(truth), labels)


def probe_scores(scorer, probes: ProbeSet, images: list) -> dict[str, np.ndarray]:
    """Per image: ``survived`` (CLIP picks the probe's own concept) and, for face conditions,
    ``face`` (a face is found)."""
    pred = scorer.clip.zero_shot(to_uint8(images, scorer.res), probes.labels)
    out = {"survived": (pred == probes.truth).astype(float)}
    if scorer.about_faces:
        out["face"] = scorer.face_found(images).astype(float)
    return out
