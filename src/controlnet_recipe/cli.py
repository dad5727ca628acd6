"""The one command line: ``python -m controlnet_recipe <stage> [--params params.yaml] [--gpu TIER]``."""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError, load_config

STAGES = ("data", "photoreal", "conditions", "captions", "base", "cache", "evaluator", "train", "evaluate")
COMMANDS = ("generate", "web")  # try a trained model; their own options: <command> --help


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["doctor"]:  # checks the machine (GPU, bitsandbytes, xformers); needs no params.yaml
        return importlib.import_module(".doctor", __package__).main(argv[1:])
    own_help = bool(argv) and argv[0] in COMMANDS  # `generate --help` shows generate's options
    p = argparse.ArgumentParser(prog="controlnet-recipe", description=__doc__, add_help=not own_help)
    p.add_argument(
        "stage",
        choices=(*STAGES, "check", "publish", *COMMANDS, "doctor"),
        help="pipeline stage to run, 'check' to validate params, 'publish' to push to the Hub, "
        "'generate' or 'web' to try a trained model",
    )
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--gpu", default=None, help="override the memory tier named in params")
    p.add_argument("--recipe", default=None, help="override the recipe block named in params")
    args, rest = p.parse_known_args(argv)
    if rest and args.stage not in COMMANDS:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    overrides = {k: v for k, v in (("gpu", args.gpu), ("recipe", args.recipe)) if v}
    try:
        cfg = load_config(args.params, overrides)
        if args.stage == "check":
            print(f"{args.params}: ok (recipe {cfg.recipe_name}, gpu {cfg.gpu})")
            return 0
        if args.stage in COMMANDS:
            return importlib.import_module(f".{args.stage}", __package__).main(cfg, rest)
        module = ".publish" if args.stage == "publish" else f".stages.{args.stage}"
        importlib.import_module(module, __package__).main(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
