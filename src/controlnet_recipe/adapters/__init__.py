"""Kinds of control (params: ``adapter.kind``): one module each, an :class:`Adapter` subclass
listed in ``KINDS``. The trainer, the sampling code, the sweep, ``generate`` and the model card ask
:func:`adapter` (or :func:`adapter_of` for a saved folder) and call its methods; none of them names
a kind. Adding a kind is one module plus its tests (and its name in ``config.AdapterCfg.kind``)."""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

from ..core.config import ConfigError
from .adapter import Adapter

# kind -> module:class (imported when used)
KINDS = {
    "controlnet": "controlnet:ControlNet",
    "controlnet_lora": "controlnet_lora:ControlNetLoRA",
    "t2i_adapter": "t2i_adapter:T2IAdapterKind",
    "controlnet_xs": "controlnet_xs:ControlNetXS",
    "control_lora": "control_lora:ControlLoRA",
}
ADAPTER_FILE = "adapter.json"  # written beside a trained module: its kind and settings

__all__ = ["ADAPTER_FILE", "KINDS", "Adapter", "adapter", "adapter_of", "check", "holds_model", "settings_of"]


def adapter(kind: str) -> Adapter:
    if kind not in KINDS:
        raise ConfigError(f"adapter.kind {kind!r}: expected one of {', '.join(KINDS)}")
    module, cls = KINDS[kind].split(":")
    return getattr(import_module(f".{module}", __name__), cls)()


def check(a, family: str, where: str = "adapter") -> Adapter:
    """The recipe's adapter (``a``: its ``adapter`` params) if it runs on ``family`` with these
    settings; else one line naming the pair or the setting."""
    kind = adapter(a.kind)
    kind.check(family, a, where)
    return kind


def adapter_of(folder: Path) -> Adapter:
    """The kind that saved ``folder`` (its adapter.json; a folder without one holds a ControlNet,
    as every model before the adapter seam did)."""
    return adapter(settings_of(folder).get("kind", "controlnet"))


def settings_of(folder: Path) -> dict:
    """The adapter params a trained folder was made with (``{}`` before the adapter seam)."""
    f = Path(folder) / ADAPTER_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def holds_model(folder: Path) -> bool:
    """Whether ``folder`` holds a trained module: every file its kind saves."""
    folder = Path(folder)
    return folder.is_dir() and all((folder / f).is_file() for f in adapter_of(folder).files)
