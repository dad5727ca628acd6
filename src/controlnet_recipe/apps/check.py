"""``check``: params.yaml validated (every key, the tier against the family), the adapter against
the base's family where params name it; with ``--adapter`` (``make ADAPTER=``), that kind written
into the recipe's block once it is checked, and, on the tiny base, the UNet the kind needs
(``base.tiny.layers_per_block``)."""

from __future__ import annotations

import re
from pathlib import Path

from ..adapters import adapter
from ..adapters import check as check_adapter
from ..core.config import ConfigError, load_config


def main(cfg, params: str, kind: str | None) -> int:
    """``check``: the params, and the adapter against the base's family where params name it
    (the tiny base's is sd); with ``kind``, that adapter written into the recipe's block first."""
    b, where = cfg.recipe.base, f"{cfg.recipe_name}.adapter"
    family = b.family if b.family != "auto" else None if b.pretrained_model else "sd"
    if kind:  # checked before it is written
        if family:
            check_adapter(cfg.recipe.adapter.model_copy(update={"kind": kind}), family, where)
        set_adapter_kind(Path(params), cfg.recipe_name, kind)
        layers = adapter(kind).tiny_layers_per_block
        if b.pretrained_model is None and b.tiny.layers_per_block != layers:
            set_block_value(Path(params), cfg.recipe_name, "layers_per_block", str(layers))
        cfg = load_config(params, {"recipe": cfg.recipe_name, "gpu": cfg.gpu})
    if family:
        check_adapter(cfg.recipe.adapter, family, where)
    print(f"{params}: ok (recipe {cfg.recipe_name}, adapter {cfg.recipe.adapter.kind}, gpu {cfg.gpu})")
    return 0


def _edit_block(params: Path, recipe: str, line: str, old: str, new: str, what: str) -> None:
    """In the recipe's block of ``params``, the first line matching ``line``: ``old`` -> ``new``
    (regexes); else one line naming ``what`` was expected."""
    lines = params.read_text().splitlines(keepends=True)
    start = lines.index(f"{recipe}:\n") if f"{recipe}:\n" in lines else None
    for i in range(start + 1 if start is not None else len(lines), len(lines)):
        if re.match(r"\S", lines[i]):
            break
        if re.match(line, lines[i]):
            lines[i] = re.sub(old, new, lines[i], count=1)
            params.write_text("".join(lines))
            return
    raise ConfigError(f"{params}: {recipe}: expected {what} in the block")


def set_adapter_kind(params: Path, recipe: str, kind: str) -> None:
    """Write ``kind`` into the recipe block's one-line ``adapter: {kind: ...}`` in ``params``."""
    adapter(kind)  # a known kind, or one line naming them
    _edit_block(params, recipe, r"  adapter: \{kind: \w+", r"\{kind: \w+", "{kind: " + kind, "a one-line 'adapter: {kind: ...}'")
    print(f"{params}: {recipe}.adapter.kind: {kind}")


def set_block_value(params: Path, recipe: str, key: str, value: str) -> None:
    """Write ``key: value`` where the recipe's block sets ``key`` (a line of its own, or a key of
    a one-line mapping)."""
    _edit_block(params, recipe, rf"\s+.*\b{key}: ", rf"\b{key}: [^,}}\s]+", f"{key}: {value}", f"a line setting {key}")
    print(f"{params}: {recipe}: {key}: {value}")
