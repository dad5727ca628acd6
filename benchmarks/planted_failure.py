"""A planted failure: does the evaluation catch a ControlNet that learned nothing about its condition?

After `make demo`, this trains a second ControlNet with the same recipe but `train.shuffle_conditions:
true` (every image paired with another sample's condition), evaluates it the same way, and prints
both next to each other. The evaluation works if the shuffled one does not beat the base on fidelity.

    python benchmarks/planted_failure.py [--params params.yaml] [--work /tmp/planted]

It reuses the demo's data, cache, base and evaluator (symlinked), so only train and evaluate run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

SHARED = ("data", "models/base", "models/evaluator")
SHOWN = (
    "fidelity",
    "fidelity_base",
    "fidelity_gain",
    "fidelity_gain_low",
    "fidelity_gain_high",
    "beats_base",
    "nme",
    "nme_base",
    "detection_failure_rate",
    "chosen_step",
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--work", default="/tmp/planted-failure")
    args = p.parse_args()
    root = Path.cwd()
    for need in (*SHARED, "eval/metrics.json"):
        if not (root / need).exists():
            sys.exit(f"{need}: missing; run `make demo` first")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "models").mkdir(parents=True)
    for name in SHARED:
        (work / name).symlink_to(root / name)
    params = yaml.safe_load((root / args.params).read_text())
    params[params["recipe"]]["train"]["shuffle_conditions"] = True
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("train", "evaluate"):
        subprocess.run([sys.executable, "-m", "controlnet_recipe", stage], cwd=work, check=True)
    real = json.loads((root / "eval/metrics.json").read_text())
    planted = json.loads((work / "eval/metrics.json").read_text())
    print(f"\n{'metric':<22}{'trained':>12}{'shuffled':>12}")
    for k in SHOWN:
        print(f"{k:<22}{real.get(k)!s:>12.10}{planted.get(k)!s:>12.10}")
    caught = real["beats_base"] and not planted["beats_base"]
    print(
        f"\nplanted failure {'caught' if caught else 'NOT caught'}: the shuffled ControlNet "
        f"{'does not beat' if not planted['beats_base'] else 'beats'} the base (report: {work}/eval/report.html)"
    )
    return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main())
