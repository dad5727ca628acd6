"""The one command line: ``python -m controlnet_recipe <stage> [--params params.yaml] [--gpu TIER]``."""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import time
from pathlib import Path

from .core.config import load_config
from .core.errors import RecipeError
from .core.logs import quiet_libraries

STAGES = ("data", "photoreal", "conditions", "captions", "base", "cache", "evaluator", "train", "evaluate")
COMMANDS = ("generate", "web", "plan")  # their own options: <command> --help
OWN_OPTIONS = (*COMMANDS, "doctor")  # doctor checks the machine and needs no params file
# A folder: each process appends the package files it imported to <folder>/<stage>.txt at exit, so
# tests can check dvc.yaml's deps against what a stage really ran (tests/test_dvc_deps.py).
RECORD_IMPORTS = "CONTROLNET_RECIPE_RECORD_IMPORTS"


def _record_imports(stage: str) -> None:
    folder = os.environ.get(RECORD_IMPORTS)
    if not folder:
        return
    package = Path(__file__).resolve().parent

    def write() -> None:
        mods = [m for n, m in list(sys.modules.items()) if n.split(".")[0] == __package__]
        files = {Path(m.__file__).resolve() for m in mods if getattr(m, "__file__", None)}
        lines = sorted(f.relative_to(package).as_posix() for f in files if f.is_relative_to(package))
        with open(Path(folder, f"{stage}.txt"), "a") as out:
            out.write("".join(line + "\n" for line in lines))

    Path(folder).mkdir(parents=True, exist_ok=True)
    atexit.register(write)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_libraries()  # before any library is imported
    own_help = any(a in OWN_OPTIONS for a in argv)  # `generate --help` shows generate's options
    p = argparse.ArgumentParser(prog="controlnet-recipe", description=__doc__, add_help=not own_help)
    p.add_argument(
        "stage",
        choices=(*STAGES, "check", "publish", *COMMANDS, "doctor"),
        help="pipeline stage to run, 'check' to validate params, 'publish' to push to the Hub, "
        "'generate' or 'web' to try a trained model, 'plan' to predict GPU memory per tier",
    )
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--gpu", default=None, help="override the memory tier named in params")
    p.add_argument("--recipe", default=None, help="override the recipe block named in params")
    p.add_argument(
        "--adapter", default=None, help="check: write this adapter.kind into the recipe's block (make ADAPTER=); plan: plan it"
    )
    args, rest = p.parse_known_args(argv)
    if rest and args.stage not in OWN_OPTIONS:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.stage == "doctor":
        return importlib.import_module(".apps.doctor", __package__).main(rest)
    _record_imports(args.stage)
    overrides = {k: v for k, v in (("gpu", args.gpu), ("recipe", args.recipe)) if v}
    try:
        cfg = load_config(args.params, overrides)
        if args.stage == "check":
            return importlib.import_module(".apps.check", __package__).main(cfg, args.params, args.adapter)
        if args.stage in COMMANDS:
            module = ".planning.cli" if args.stage == "plan" else f".apps.{args.stage}"
            extra = ["--adapter", args.adapter] if args.stage == "plan" and args.adapter else []
            return importlib.import_module(module, __package__).main(cfg, rest + extra)
        module = ".apps.publish" if args.stage == "publish" else f".stages.{args.stage}"
        t0 = time.perf_counter()
        stage = importlib.import_module(module, __package__)
        t1 = time.perf_counter()
        stage.main(cfg)
        print(f"{args.stage}: done in {time.perf_counter() - t0:.1f} s (imports {t1 - t0:.1f} s)")
    except RecipeError as e:  # expected (a bad params file, a missing input): one line; anything else is a bug
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
