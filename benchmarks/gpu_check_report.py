"""gpu_check.py's report: the measured rows side by side with the planner's predictions, and
``--compare``: rows measured on a GPU against the predictions computed now."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

# the fields of a row that name its configuration (the rest: predictions and measurements)
CONFIG_KEYS = ("kind", "arch", "resolution", "tier", "mode", "recipe", "vae_slicing", "gradient_checkpointing", "adam")
CONFIG_KEYS += ("per_step_encoding", "label", "family", "controlnet_layers")


def table(rows: list[dict], dry: bool) -> str:
    """The rows side by side, then the ranges of predicted/measured and reserved/allocated, then
    the recipe's step against upstream's, tier by tier."""
    cols = ("batch", "samples/s", "TFLOP/s", "MFU", "alloc GiB", "reserved", "predicted", "pred/meas")
    lines = [f"{'arch':<10} {'tier':<10} {'res':>4} {'mode':<24} " + " ".join(f"{c:>9}" for c in cols)]
    for r in rows:
        arch = ("tiny-flux" if dry else "flux1-dev") if r["kind"] == "flux" else r["arch"]
        if r["kind"] == "transformer" and dry:
            arch = f"tiny-{r['family']}"
        if r["kind"] == "validation":
            r = {**r, "tier": f"{r['tier']} {r['recipe']}"}
        lead = f"{arch:<10} {r['tier']:<10} {r['resolution']:>4} {r['mode']:<24}"
        if "skipped" in r or "error" in r:
            lines.append(f"{lead} {r.get('skipped') or r.get('error')}")
            continue
        mfu = None if r.get("mfu") is None else f"{r['mfu']:.1%}"
        cells = [r.get("micro_batch", 1), r["samples_per_s"], r.get("tflops"), mfu]
        cells += [r.get("peak_allocated_gb"), r.get("peak_reserved_gb")]
        cells += [r["predicted_allocated_gib"], r.get("predicted_over_measured")]
        lines.append(
            lead
            + " "
            + " ".join(f"{'-':>9}" if v is None else f"{v:>9.2f}" if isinstance(v, float) else f"{v:>9}" for v in cells)
        )
    measured = [r for r in rows if "predicted_over_measured" in r]
    if measured:
        ratios = [r["predicted_over_measured"] for r in measured]
        reserved = [r["reserved_over_allocated"] for r in measured]
        lines.append(
            f"predicted/measured allocated peak: {min(ratios):.2f} to {max(ratios):.2f} over {len(ratios)} configurations; "
            f"reserved/allocated: {min(reserved):.2f} to {max(reserved):.2f}"
        )
    for r in rows:
        if r.get("setup_peak_allocated_gb") and r.get("peak_allocated_gb"):
            lines.append(
                f"{r['arch']} {r['tier']} {r['mode']}: setup peak {r['setup_peak_allocated_gb']:.2f} GiB allocated "
                f"(the frozen transformer on the GPU before its settings), steps {r['peak_allocated_gb']:.2f}"
            )
    ran = {(r["arch"], r["tier"], r["mode"]): r for r in rows if "samples_per_s" in r}
    for (arch, tier, mode), r in ran.items():
        up = ran.get((arch, tier, "per-step encoding"))
        if mode == "recipe" and up:
            lines.append(f"{arch} {tier}: recipe / upstream step = {r['samples_per_s'] / up['samples_per_s']:.2f}x samples/s")
    return "\n".join(lines)


def compare(files: list[Path], predict: Callable[[dict], dict]) -> None:
    """Rows measured on a GPU against the planner's predictions for them (``predict``: a
    configuration's, computed now), as a table, with each step's TFLOP/s and MFU on the card that
    measured it (the FLOPs counted now)."""
    from controlnet_recipe.planning.flops import mfu

    rows = []
    for f in files:
        measured = json.loads(f.read_text())
        for r in measured["rows"]:
            if "peak_allocated_gb" not in r:
                continue
            c = {k: r[k] for k in CONFIG_KEYS if k in r}
            if c["kind"] == "validation":
                c.setdefault("vae_slicing", False)
            p = predict(c)
            rows.append({**r, **p, "predicted_over_measured": p["predicted_allocated_gib"] / r["peak_allocated_gb"]})
            if p.get("flops_per_sample") and r.get("samples_per_s"):  # MFU on the card that measured it
                rows[-1]["tflops"] = r["samples_per_s"] * p["flops_per_sample"] / 1e12
                rows[-1]["mfu"] = mfu(r["samples_per_s"], p["flops_per_sample"], measured["device"], p["dtype"])
            rows[-1]["reserved_over_allocated"] = r["peak_reserved_gb"] / r["peak_allocated_gb"]
    print(table(rows, dry=False))
