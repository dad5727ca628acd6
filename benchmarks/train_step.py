"""Training-step benchmark: steps/s and peak memory of the train stage's step, with VAE and text
encoding on every step (as upstream's train_controlnet.py does) against the latent cache.

    python benchmarks/train_step.py                                   # CPU: tiny + SD2.1-base at 128 px
    python benchmarks/train_step.py --arch sd21-base --resolution 512 --tiers 8gb 12gb 16gb 24gb 40gb 80gb

Each configuration runs in its own process, so peak memory (RSS on CPU; allocated and reserved
CUDA memory on a GPU) is its own. Weights are random: architectures are built from their configs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def child(spec: dict) -> dict:
    """Build the models, run warm-up + timed optimizer steps of one configuration, measure."""
    import torch
    from accelerate import Accelerator

    from controlnet_recipe.config import load_config
    from controlnet_recipe.models import architectures, tiny
    from controlnet_recipe.stages.train import controlnet_from_unet, controlnet_loss
    from controlnet_recipe.training.batches import step_generator
    from controlnet_recipe.training.memory import apply_model_settings, make_optimizer

    cfg = load_config(ROOT / "params.yaml")
    tier = cfg.tiers[spec["tier"]]
    t = cfg.recipe.train
    res, micro, accum = spec["resolution"], spec["micro_batch"], spec["accumulation"]
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=tier.mixed_precision, gradient_accumulation_steps=accum, cpu=not cuda)
    device = accelerator.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tier.mixed_precision, torch.float32)
    torch.manual_seed(0)
    per_step = spec["mode"] == "per-step encoding"
    # With the cache, the VAE and the text encoder are never built: training does not need them.
    if spec["arch"] == "tiny":
        unet, scheduler, vae_cfg = tiny.build_unet(res), tiny.build_scheduler(), tiny.build_vae(res).config
        vae, text_encoder = (tiny.build_vae(res), tiny.build_text_encoder(1000)) if per_step else (None, None)
    else:
        parts = architectures.build(spec["arch"], ("unet", "scheduler", *(("vae", "text_encoder") if per_step else ())))
        unet, scheduler, vae_cfg = parts["unet"], parts["scheduler"], architectures.vae_config(spec["arch"])
        vae, text_encoder = parts.get("vae"), parts.get("text_encoder")
    unet.requires_grad_(False).eval()
    controlnet = controlnet_from_unet(unet, vae_cfg)
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)  # the VAE's downsampling
    unet.to(device, dtype)
    if per_step:  # upstream: VAE and text encoder on the GPU, run every step
        for m in (vae, text_encoder):
            m.requires_grad_(False).eval().to(device, dtype)
    apply_model_settings(unet, controlnet, tier)
    controlnet.train()
    optimizer = make_optimizer(controlnet.parameters(), tier, t, 1e-5)
    controlnet, optimizer = accelerator.prepare(controlnet, optimizer)

    lat = (4, res // down, res // down)
    n_tokens, dim = (tiny.MAX_TOKENS, tiny.TEXT_DIM) if spec["arch"] == "tiny" else (77, unet.config.cross_attention_dim)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(micro, 3, res, res, generator=g) * 2 - 1
    ids = torch.randint(0, 1000, (micro, n_tokens), generator=g)
    cond = torch.rand(micro, 3, res, res, generator=g)
    cached = {
        "latent_mean": torch.randn(micro, *lat, generator=g),
        "latent_std": torch.full((micro, *lat), 0.01),
        "text_embedding": torch.randn(micro, n_tokens, dim, generator=g),
    }
    empty = torch.zeros(1, n_tokens, dim)

    def batch() -> dict:
        if not per_step:
            return {**cached, "conditioning": cond}
        with torch.no_grad():
            dist = vae.encode(pixels.to(device, dtype)).latent_dist
            text = text_encoder(ids.to(device))[0]
        return {
            "latent_mean": dist.mean.float(),
            "latent_std": dist.std.float(),
            "text_embedding": text.float(),
            "conditioning": cond,
        }

    def optimizer_step(step: int) -> None:
        for m in range(accum):
            with accelerator.accumulate(controlnet):
                loss = controlnet_loss(
                    controlnet, unet, scheduler, batch(), empty, 0.18215, 0.1, step_generator(0, step, m, 0), device, dtype
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(controlnet.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=tier.set_grads_to_none)

    for s in range(spec["warmup"]):
        optimizer_step(s)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(spec["steps"]):
        optimizer_step(spec["warmup"] + s)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {
        **spec,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "steps_per_s": spec["steps"] / seconds,
        "samples_per_s": spec["steps"] * micro * accum / seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }
    if cuda:
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1024**3
    return out


def run_child(spec: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        return {**spec, "error": (p.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--arch", nargs="+", default=["tiny", "sd21-base"], help="tiny, sd15, sd21-base")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: 64 tiny, 128 full-size on CPU, 512 on GPU)")
    ap.add_argument("--tiers", nargs="+", default=["cpu"], help="memory tiers of params.yaml to apply")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--effective-batch", type=int, default=None, help="default: 1 on CPU for full-size, else each tier's micro-batch"
    )
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    from controlnet_recipe.config import accumulation_steps, load_config

    cfg = load_config(ROOT / "params.yaml")
    cuda = torch.cuda.is_available()
    rows = []
    for arch in args.arch:
        res = args.resolution or (64 if arch == "tiny" else 512 if cuda else 128)
        for tier in args.tiers:
            micro = cfg.tiers[tier].batch_size
            if not cuda and arch != "tiny":
                micro = 1  # full-size on two CPU cores: one sample per step
            effective = args.effective_batch or micro
            micro, accum = accumulation_steps(effective, micro)
            for mode in ("per-step encoding", "cached latents"):
                spec = dict(arch=arch, tier=tier, mode=mode, resolution=res, micro_batch=micro, accumulation=accum)
                spec.update(steps=args.steps, warmup=args.warmup)
                row = run_child(spec)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    mem = "peak_reserved_gb" if cuda else "peak_rss_gb"
    print(f"{'arch':<10} {'tier':<9} {'res':>4} {'batch':>7} {'mode':<18} {'steps/s':>8} {'samples/s':>9} {mem:>16}")
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:<10} {r['tier']:<9} {r['resolution']:>4} {'':>7} {r['mode']:<18} error: {r['error']}")
            continue
        batch = f"{r['micro_batch']}x{r['accumulation']}"
        print(
            f"{r['arch']:<10} {r['tier']:<9} {r['resolution']:>4} {batch:>7} {r['mode']:<18} {r['steps_per_s']:>8.3f} "
            f"{r['samples_per_s']:>9.2f} {r[mem]:>16.2f}"
        )
    print()
    for i in range(0, len(rows) - 1, 2):
        a, b = rows[i], rows[i + 1]
        if "error" not in a and "error" not in b:
            print(
                f"{a['arch']} {a['tier']} {a['resolution']} px: cached latents / per-step encoding = "
                f"{b['steps_per_s'] / a['steps_per_s']:.2f}x steps/s, {b[mem] / a[mem]:.2f}x {mem}"
            )


if __name__ == "__main__":
    main()
