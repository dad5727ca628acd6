"""Photos as they are: what the square crop cuts, and what aspect-ratio buckets keep, on a folder of
synthetic faces at mixed aspects (portrait 3:4, landscape 16:9, square, panorama 3:1) whose given
conditions are their face-part maps (``faces/mixed_folder.py``).

    python benchmarks/buckets.py                  # the crops alone: a few seconds
    python benchmarks/buckets.py --train          # and the demo trained on the folder, buckets auto (about 12 min)

Per aspect: the bucket ``auto`` picks, the share of the photo's pixels and of its face (the
condition's non-background pixels) that the square crop (``data.buckets: off``, upstream's) and
the bucket's crop keep. ``--train`` builds a project in ``--work`` (default ``tmp/bench-buckets``)
with the embedded default's settings on that folder, ``buckets: auto`` and ``conditions.kind:
given``, runs ``dvc repro`` and reports its evaluation. Writes ``benchmarks/results/buckets.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
OUT = ROOT / "benchmarks" / "results"
ENV = {
    **os.environ,
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    "DVC_NO_ANALYTICS": "1",
    **{f"GIT_{w}_{k}": v for w in ("AUTHOR", "COMMITTER") for k, v in (("NAME", "bench"), ("EMAIL", "bench@localhost"))},
}


def kept(folder: Path, resolution: int, buckets: list) -> dict:
    """Per aspect: the bucket, and the shares of pixels and of face kept by the square crop and the bucket's."""
    from PIL import Image

    from controlnet_recipe.core import buckets as B

    rows: dict[str, list] = defaultdict(list)
    for path in sorted(folder.glob("*.png")):
        kind = path.stem.split("-")[0]
        img, cond = Image.open(path), Image.open(folder / "conditions" / path.name)
        if B.skip_reason(*img.size, buckets, 4.0):
            continue
        face = np.asarray(cond.convert("RGB")).any(-1)
        row = {"size": img.size}
        for mode, bucket in (("square", (resolution, resolution)), ("bucket", B.nearest(*img.size, buckets))):
            crop = B.cover(*img.size, bucket)
            # the crop's box back in the photo's own pixels
            sx, sy = img.size[0] / crop.resized[0], img.size[1] / crop.resized[1]
            x0, y0, x1, y1 = (
                round(v) for v in (crop.left * sx, crop.top * sy, (crop.left + bucket[0]) * sx, (crop.top + bucket[1]) * sy)
            )
            row[mode] = {
                "bucket": B.name(bucket),
                "pixels": (x1 - x0) * (y1 - y0) / (img.size[0] * img.size[1]),
                "face": float(face[y0:y1, x0:x1].sum() / max(face.sum(), 1)),
            }
        rows[kind].append(row)
    return {
        kind: {
            "size": "x".join(map(str, r[0]["size"])),
            "bucket": r[0]["bucket"]["bucket"],
            **{f"{m}_{k}": float(np.mean([x[m][k] for x in r])) for m in ("square", "bucket") for k in ("pixels", "face")},
        }
        for kind, r in rows.items()
    }


def train(folder: Path, work: Path) -> dict:
    """The embedded default on ``folder`` with buckets auto, through ``dvc repro``; its evaluation."""
    if not (work / ".dvc").is_dir():
        work.mkdir(parents=True, exist_ok=True)
        shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for f in ("dvc.yaml", ".gitignore"):
            shutil.copy(ROOT / f, work / f)
        p = yaml.safe_load((ROOT / "params.yaml").read_text())
        d = p["demo"]["data"]
        d.update(source="imagefolder", location=str(folder.resolve()), conditioning_folder="conditions", num_train=None)
        d.update(buckets="auto", min_size=8)
        p["demo"]["conditions"]["kind"] = "given"
        p["demo"]["captions"].update(captioner="template", template="a photo of a face")
        (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        env = {**ENV, "PYTHONPATH": str(work / "src")}
        for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"]):
            subprocess.run(cmd, cwd=work, check=True, env=env)
        subprocess.run(["git", "commit", "-q", "-m", "bench"], cwd=work, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, check=True, env={**ENV, "PYTHONPATH": str(work / "src")})
    data = json.loads((work / "data/source/report.json").read_text())
    metrics = json.loads((work / "eval/metrics.json").read_text())
    return {"data": {k: data[k] for k in ("splits", "skipped", "buckets")}, "evaluation": metrics, "work": str(work)}


def table(rows: dict) -> str:
    head = "| photos | size | bucket (auto) | pixels kept: square | bucket | face kept: square | bucket |\n"
    head += "|---|---|---|---:|---:|---:|---:|"
    lines = [
        f"| {k} | {r['size']} | {r['bucket']} | {r['square_pixels']:.0%} | {r['bucket_pixels']:.0%} | "
        f"{r['square_face']:.0%} | {r['bucket_face']:.0%} |"
        for k, r in rows.items()
    ]
    return "\n".join([head, *lines])


def main() -> None:
    from controlnet_recipe.core.buckets import auto_buckets
    from controlnet_recipe.faces.mixed_folder import write_mixed_folder
    from controlnet_recipe.models.tiny import SIZE_MULTIPLE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-aspect", type=int, default=250, help="photos of each aspect")
    ap.add_argument("--train", action="store_true", help="also train the demo on the folder (buckets auto)")
    ap.add_argument("--work", type=Path, default=ROOT / "tmp" / "bench-buckets")
    args = ap.parse_args()
    folder = args.work / "images"
    if not folder.is_dir():
        write_mixed_folder(args.work, args.per_aspect)
    res = 64
    rows = kept(folder, res, auto_buckets(res, SIZE_MULTIPLE, 4.0))
    print(table(rows))
    out = {"resolution": res, "per_aspect": args.per_aspect, "kept": rows}
    if args.train:
        out["trained"] = train(folder, args.work / "project")
        e = out["trained"]["evaluation"]
        print(json.dumps(out["trained"]["data"]), "\n", json.dumps({k: e[k] for k in e if not isinstance(e[k], dict)}))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "buckets.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
