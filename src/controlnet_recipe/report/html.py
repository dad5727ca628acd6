"""The evaluation report: one HTML page (grids, curves, tables) next to the files it shows."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from ..core.config import Config


def write_report(
    out: Path, cfg: Config, metrics: dict, summary: dict, sweep: list[dict], rule: str, settings: dict, model: str = "ControlNet"
) -> Path:
    env = Environment(loader=PackageLoader("controlnet_recipe", "report/templates"), autoescape=select_autoescape())
    env.filters["num"] = lambda v, d=3: "n/a" if v is None or v != v else f"{v:.{d}f}"
    html = env.get_template("report.html").render(
        recipe=cfg.recipe_name,
        model=model,
        cfg=cfg.recipe,
        m=metrics,
        s=summary,
        sweep=sweep,
        sweep_keys=[k for k in sweep[0] if k != "step"],
        rule=rule,
        settings=settings,
        has=lambda name: (out / name).is_file(),
    )
    path = out / "report.html"
    path.write_text(html)
    return path
