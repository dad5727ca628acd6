"""Condition kinds: one module each, a :class:`Condition` subclass listed in ``KINDS``. Every stage,
``generate``, the web demo and the evaluation ask :func:`condition` for the recipe's kind and call
its methods; none of them names a kind. Adding a kind is one module plus its tests (and its name in
``config.ConditionsCfg.kind``)."""

from __future__ import annotations

from importlib import import_module

from .condition import Condition, ConditionError, Fidelity, Made

# kind -> module:class (imported when used: a kind's models load only for its recipes)
KINDS = {
    "face_segmentation": "face_segmentation:FaceSegmentation",
    "face_depth": "face_depth:FaceDepth",
    "canny": "canny:Canny",
    "given": "given:Given",
    "depth": "model_made:Depth",
    "segmentation": "model_made:Segmentation",
}

__all__ = ["KINDS", "Condition", "ConditionError", "Fidelity", "Made", "condition"]


def condition(c) -> Condition:
    """The recipe's condition kind (``c``: its ``conditions`` params)."""
    if c.kind not in KINDS:
        raise ValueError(f"conditions.kind {c.kind!r}: expected one of {', '.join(KINDS)}")
    module, cls = KINDS[c.kind].split(":")
    return getattr(import_module(f".{module}", __name__), cls)(c)
