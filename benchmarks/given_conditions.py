"""Your own condition, measured: folders of (image, condition) pairs of each map type, trained and
evaluated with ``conditions.kind: given`` at the embedded default's size, each beside a planted
failure (the same training on shuffled pairs).

    python benchmarks/given_conditions.py [--types categorical binary continuous] [--work /tmp/given]

Per type it writes the pairs: the synthetic faces (the embedded default's renders, seeds and
captions, as side .txt files) with their conditions drawn as a face-part map (categorical),
part outlines (binary) or a depth-like shading (continuous), then runs every stage on the folder
in ``<work>/<type>`` as a user would (the base is trained once and shared: the images are the
same; ``--base`` reuses one already trained on these synthetic faces, such as ``make demo``'s).
Then ``train.shuffle_conditions: true`` trains and evaluates on the same data. It prints the
metric the evaluation chose and why, the base, the ControlNet and the ceiling with the paired
gain's interval, and the shuffled ControlNet's; results/given_conditions.json and
results/given_<type>_grid.png keep them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "photoreal", "conditions", "captions", "base", "cache", "evaluator", "train", "evaluate")
SHARED = ("data", "models/base", "models/evaluator")  # what the shuffled run reuses


def write_pairs(folder: Path, kind: str, seeds: list[int], size: int) -> None:
    from controlnet_recipe.faces.draw import draw_depth, draw_outline, draw_segmentation
    from controlnet_recipe.faces.synthetic import describe, make_face

    draw = {"categorical": draw_segmentation, "binary": draw_outline, "continuous": draw_depth}[kind]
    for sub in ("images", "conditions"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        img, lm, attrs = make_face(seed, size)
        img.save(folder / "images" / f"{seed}.png")
        (folder / "images" / f"{seed}.txt").write_text(describe(attrs))
        draw([lm], (size, size)).save(folder / "conditions" / f"{seed}.png")


def gallery(path: Path, size: int = 128, n: int = 4) -> None:
    """What each kind of map looks like on the same faces: the three drawn here, and Canny's."""
    from controlnet_recipe.conditions.canny import canny
    from controlnet_recipe.faces.draw import draw_depth, draw_outline, draw_segmentation
    from controlnet_recipe.faces.synthetic import make_face
    from controlnet_recipe.report.grid import save_grid

    rows = []
    for seed in range(n):
        img, lm, _ = make_face(seed, size)
        rows.append([img, *(draw([lm], img.size) for draw in (draw_segmentation, draw_outline, draw_depth)), canny(img)])
    titles = ["image", "categorical (face parts)", "binary (outlines)", "continuous (depth-like)", "binary (Canny)"]
    save_grid(rows, path, col_titles=titles, cell=size)


def run(stages: tuple[str, ...], cwd: Path) -> None:
    for stage in stages:
        subprocess.run([sys.executable, "-m", "controlnet_recipe", stage], cwd=cwd, check=True)


def params_for(base: dict, folder: Path, n: int, shuffle: bool = False) -> dict:
    p = json.loads(json.dumps(base))
    r = p["demo"]
    r["data"].update(
        source="imagefolder", location=str(folder / "images"), conditioning_folder=str(folder / "conditions"), num_train=None
    )
    r["data"]["num_validation"] = min(r["data"]["num_validation"], n // 10)
    r["conditions"]["kind"] = "given"
    r["captions"]["captioner"] = "given"
    r["train"]["shuffle_conditions"] = shuffle
    p["recipe"] = "demo"
    return p


def interval(m: dict) -> str:
    return f"{m['fidelity_gain']:+.3f} [{m['fidelity_gain_low']:+.3f}, {m['fidelity_gain_high']:+.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["categorical", "binary", "continuous"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/given-conditions"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--base", type=Path, default=None, help="a models/base to reuse (make demo's); else trained once here")
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    d = base["demo"]["data"]
    n = d["num_train"] + d["num_validation"]
    seeds = list(range(n))
    args.out.mkdir(parents=True, exist_ok=True)
    gallery(args.out / "conditions_gallery.png")
    results, shared_base = {}, args.base
    for kind in args.types:
        work = args.work / kind
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_pairs(work / "pairs", kind, seeds, d["resolution"])
        (work / "params.yaml").write_text(yaml.safe_dump(params_for(base, work / "pairs", n), sort_keys=False))
        if shared_base is None:
            run(STAGES, work)
            shared_base = work / "models/base"
        else:
            run(STAGES[:4], work)
            (work / "models").mkdir(exist_ok=True)
            shutil.copytree(shared_base, work / "models/base", symlinks=True)
            run(STAGES[5:], work)
        shuffled = args.work / f"{kind}-shuffled"
        shutil.rmtree(shuffled, ignore_errors=True)
        (shuffled / "models").mkdir(parents=True)
        for name in SHARED:
            (shuffled / name).symlink_to(work / name)
        (shuffled / "params.yaml").write_text(yaml.safe_dump(params_for(base, work / "pairs", n, shuffle=True), sort_keys=False))
        run(("train", "evaluate"), shuffled)
        m = json.loads((work / "eval/metrics.json").read_text())
        s = json.loads((work / "eval/summary.json").read_text())
        ms = json.loads((shuffled / "eval/metrics.json").read_text())
        results[kind] = {"fidelity": s["fidelity"], "trained": m, "shuffled": ms}
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / "eval/grid.png", args.out / f"given_{kind}_grid.png")
        (args.out / "given_conditions.json").write_text(json.dumps(results, indent=2))
    print("\n" + "  ".join(("type", "metric", "base", "ControlNet", "ceiling", "gain [95% CI]", "shuffled gain [95% CI]")))
    ok = True
    for kind, r in results.items():
        m, ms = r["trained"], r["shuffled"]
        gain, sgain = (interval(x) for x in (m, ms))
        scores = f"{m['fidelity_base']:.3f}  {m['fidelity']:.3f}  {m['fidelity_ceiling']:.3f}"
        print(f"{kind}  {m['fidelity_metric']}  {scores}  {gain}  {sgain}")
        print(f"    why: {r['fidelity']['why']}; the conditions are {r['fidelity']['map_type_why']}")
        faces = [k for k in m if "face" in k or "nme" in k]
        print(f"    beats the base: {m['beats_base']}; shuffled beats it: {ms['beats_base']}; face metrics: {faces or 'none'}")
        ok &= m["beats_base"] and not ms["beats_base"] and not faces
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
