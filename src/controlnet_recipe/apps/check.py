"""``check``: params.yaml validated (every key, the tier against the family), the adapter against
the base's family where params name it; with ``--adapter`` (``make ADAPTER=``), that kind written
into the recipe's block once it is checked."""

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
        cfg = load_config(params, {"recipe": cfg.recipe_name, "gpu": cfg.gpu})
    if family:
        check_adapter(cfg.recipe.adapter, family, where)
    print(f"{params}: ok (recipe {cfg.recipe_name}, adapter {cfg.recipe.adapter.kind}, gpu {cfg.gpu})")
    return 0


def set_adapter_kind(params: Path, recipe: str, kind: str) -> None:
    """Write ``kind`` into the recipe block's one-line ``adapter: {kind: ...}`` in ``params``."""
    adapter(kind)  # a known kind, or one line naming them
    lines = params.read_text().splitlines(keepends=True)
    start = lines.index(f"{recipe}:\n") if f"{recipe}:\n" in lines else None
    for i in range(start + 1 if start is not None else len(lines), len(lines)):
        if re.match(r"\S", lines[i]):
            break
        if re.match(r"  adapter: \{kind: \w+", lines[i]):
            lines[i] = re.sub(r"\{kind: \w+", "{kind: " + kind, lines[i], count=1)
            params.write_text("".join(lines))
            print(f"{params}: {recipe}.adapter.kind: {kind}")
            return
    raise ConfigError(f"{params}: {recipe}.adapter: expected a one-line mapping 'adapter: {{kind: ...}}' in the block")
