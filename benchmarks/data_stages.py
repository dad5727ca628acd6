"""Data-stage benchmark: images/s of the conditions and captions stages, and peak memory of the
data -> conditions -> captions stages at 1k and at 10k images (it should not grow with the size).

    python benchmarks/data_stages.py                    # this machine: every core, the CPU
    python benchmarks/data_stages.py --sizes 1000 10000 --resolution 128

Each run is its own process in its own folder; peak memory is the largest resident set of that
process and of its worker processes. BLIP is the blip-image-captioning-large architecture built
from its config with random weights (no download): it always generates ``max_new_tokens`` tokens,
so its images/s is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _params(folder: Path, data: dict, conditions: dict, captions: dict) -> Path:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    r = p["demo"]
    r["data"].update(data)
    r["conditions"].update(conditions)
    r["captions"].update(captions)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def blip_large_random(folder: Path) -> Path:
    """Salesforce/blip-image-captioning-large's architecture (ViT-L/16 at 384 px, BERT-base text
    decoder), random weights, with a placeholder vocabulary of the same size."""
    from controlnet_recipe.models.captioner import BLIP_SPECIAL_TOKENS, save_random_blip

    words = [f"w{i}" for i in range(30524 - len(BLIP_SPECIAL_TOKENS))]
    vision = dict(
        image_size=384, patch_size=16, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16
    )
    return save_random_blip(folder, words, text=dict(encoder_hidden_size=1024), vision=vision)


class AnonPeak:
    """Samples this process's anonymous resident memory (RssAnon: heap, not memory-mapped files,
    which peak RSS also counts and the kernel can drop) every 50 ms; ``peak`` in GB."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) / 1024**2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def child(spec: dict) -> dict:
    """Run the stages named in ``spec`` in a scratch folder; time the ones asked for."""
    import os

    anon = AnonPeak()

    from controlnet_recipe.core.config import load_config
    from controlnet_recipe.stages.captions import build_captions
    from controlnet_recipe.stages.conditions import build_conditions
    from controlnet_recipe.stages.data import build_data
    from controlnet_recipe.stages.photoreal import build_photoreal

    work = Path(spec["folder"])
    os.chdir(work)
    cfg = load_config(_params(work, spec["data"], spec["conditions"], spec["captions"]))
    out, n = {}, None
    t = time.perf_counter()
    report = build_data(cfg, cache_dir=work / "downloads")
    n = sum(report["splits"].values())
    out["data_s"] = time.perf_counter() - t
    build_photoreal(cfg)
    t = time.perf_counter()
    build_conditions(cfg)
    out["conditions_s"] = time.perf_counter() - t
    t = time.perf_counter()
    build_captions(cfg)
    out["captions_s"] = time.perf_counter() - t
    out["images"] = n
    for stage in ("conditions", "captions"):
        out[f"{stage}_images_per_s"] = n / out[f"{stage}_s"]
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    out["peak_anon_gb"] = anon.stop()
    out["peak_rss_workers_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    return out


def run(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "folder": tmp}
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
        if p.returncode or not lines:
            return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:300]}
        return json.loads(lines[-1])


def astronaut_folder(folder: Path, n: int, size: int) -> Path:
    """``n`` copies of a real photo (slightly shifted), for the landmark detector to find a face."""
    import numpy as np
    from PIL import Image
    from skimage.data import astronaut

    folder.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(astronaut()).resize((size, size))
    for i in range(n):
        arr = np.roll(np.asarray(base), shift=(i % 7) - 3, axis=1)
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
    return folder


def throughput_runs(args, synthetic: dict, gt: dict) -> list:
    """Conditions (dlib, Canny) on 512 px photos, and BLIP-large captions."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = astronaut_folder(Path(tmp) / "photos", args.photos, 512)
        data = {"source": "imagefolder", "location": str(photos), "num_train": None, "num_validation": 10, "resolution": 512}
        r = run(
            {"data": data, "conditions": {"kind": "face_segmentation", "detector": "dlib"}, "captions": {"captioner": "none"}}
        )
        rows.append(("512 px photos, dlib landmarks", args.photos, r))
        print(json.dumps(r), flush=True)
        r = run({"data": data, "conditions": {"kind": "canny"}, "captions": {"captioner": "none"}})
        rows.append(("512 px photos, Canny edges", args.photos, r))
        print(json.dumps(r), flush=True)
        blip = blip_large_random(Path(tmp) / "blip")
        few = {**synthetic, "num_train": args.blip_images, "num_validation": 1, "resolution": 512}
        r = run({"data": few, "conditions": gt, "captions": {"captioner": "blip", "model": str(blip), "batch_size": 8}})
        rows.append(("BLIP-large architecture (random weights, 30 tokens), 512 px", args.blip_images, r))
        print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="dataset sizes for the memory check")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--photos", type=int, default=200, help="photos for the dlib throughput run")
    ap.add_argument("--blip-images", type=int, default=32, help="images for the BLIP-large throughput run")
    ap.add_argument("--memory-only", action="store_true", help="only the 1k-vs-10k memory runs")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    rows = []
    synthetic = {"source": "synthetic", "resolution": args.resolution, "num_validation": 50, "shard_size": 1000}
    gt = {"kind": "face_segmentation", "detector": "ground_truth"}
    for n in args.sizes:
        r = run({"data": {**synthetic, "num_train": n}, "conditions": gt, "captions": {"captioner": "attributes"}})
        rows.append(("synthetic faces, ground-truth landmarks, attribute captions", n, r))
        print(json.dumps({"size": n, **r}), flush=True)
    if not args.memory_only:
        rows += throughput_runs(args, synthetic, gt)
    print()
    print(
        f"{'run':<64} {'images':>7} {'conditions img/s':>17} {'captions img/s':>15} "
        f"{'peak RSS GB (main, workers)':>28} {'peak anon GB (main)':>20}"
    )
    for name, n, r in rows:
        if "error" in r:
            print(f"{name:<64} {n:>7} error: {r['error']}")
            continue
        mem = f"{r['peak_rss_gb']:.2f}, {r['peak_rss_workers_gb']:.2f}"
        print(
            f"{name:<64} {r['images']:>7} {r['conditions_images_per_s']:>17.1f} {r['captions_images_per_s']:>15.1f} {mem:>28} "
            f"{r['peak_anon_gb']:>20.2f}"
        )
    sized = [(n, r) for name, n, r in rows if name.startswith("synthetic") and "error" not in r]
    if len(sized) >= 2:
        (n0, a), (n1, b) = sized[0], sized[-1]
        print(
            f"\npeak memory at {n1} vs {n0} images: main RSS {b['peak_rss_gb'] / a['peak_rss_gb']:.2f}x, "
            f"main anonymous {b['peak_anon_gb'] / a['peak_anon_gb']:.2f}x, "
            f"workers {b['peak_rss_workers_gb'] / a['peak_rss_workers_gb']:.2f}x (data {n1 / n0:.0f}x)"
        )


if __name__ == "__main__":
    main()
