"""The one command line: ``python -m controlnet_recipe <stage> [--params params.yaml] [--gpu TIER]``."""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError, load_config

STAGES = ("data", "photoreal", "conditions", "captions", "base", "cache", "evaluator", "train", "evaluate")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="controlnet-recipe", description=__doc__)
    p.add_argument(
        "stage",
        choices=(*STAGES, "check", "publish"),
        help="pipeline stage to run, 'check' to validate params, 'publish' to push to the Hub",
    )
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--gpu", default=None, help="override the memory tier named in params")
    p.add_argument("--recipe", default=None, help="override the recipe block named in params")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("gpu", args.gpu), ("recipe", args.recipe)) if v}
    try:
        cfg = load_config(args.params, overrides)
        if args.stage == "check":
            print(f"{args.params}: ok (recipe {cfg.recipe_name}, gpu {cfg.gpu})")
            return 0
        module = ".publish" if args.stage == "publish" else f".stages.{args.stage}"
        importlib.import_module(module, __package__).main(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
