"""Training-step benchmark: steps/s and peak memory of the train stage's step against upstream's
(train_controlnet.py: both images decoded from PNG, the VAE and the text encoder run on every step,
AdamW as it comes, no memory-format or compile switches), side by side in one run.

    python benchmarks/train_step.py                                   # CPU: tiny + SD2.1-base at 128 px
    python benchmarks/train_step.py --arch sd21-base --resolution 512 --tiers 8gb 12gb 16gb 24gb 40gb 80gb
    python benchmarks/train_step.py --arch sdxl-base --resolution 1024 --tiers sdxl-24gb sdxl-40gb sdxl-80gb
    python benchmarks/train_step.py --arch sdxl-base                  # CPU: 128 px, tier sdxl-24gb in bf16
    python benchmarks/train_step.py --switches channels_last=true compile=true mixed_precision=bf16

The recipe's step: the latent cache, conditioning images decoded once (training/batches.py), the
tier's switches (channels_last, compile), fused AdamW and no host sync per micro-step.
``--switches`` adds a row per switch, each on top of the recipe's step, to measure it alone.
For SDXL, upstream (train_controlnet_sdxl.py) computes the text embeddings once and runs the VAE
on every step: its per-step row does the same, with the pooled embedding and time ids of the
SDXL family. On a CPU, fp16 tiers run in bf16 (the CPU's half precision).

Each configuration runs in its own process, so peak memory (RSS on CPU; allocated and reserved
CUDA memory on a GPU) is its own. Weights are random: architectures are built from their configs.
On a shared or throttled machine, ``--repeats 5`` runs every variant five times, interleaved, and
reports each one's median round.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from full_size import UNetModels, build_unet_models, compute_dtype, cuda_peak_memory, text_encoder_names  # noqa: E402


def child(spec: dict) -> dict:
    """Build the models, run warm-up + timed optimizer steps of one configuration, measure."""
    import torch
    from accelerate import Accelerator

    from controlnet_recipe.core.config import load_config

    cfg = load_config(ROOT / "params.yaml")
    per_step = spec["mode"] == "per-step encoding"
    cuda = torch.cuda.is_available()
    tier = step_tier(cfg, spec, per_step, cuda)
    accum = spec["accumulation"]
    accelerator = Accelerator(mixed_precision=tier.mixed_precision, gradient_accumulation_steps=accum, cpu=not cuda)
    device = accelerator.device
    dtype = compute_dtype(tier.mixed_precision)
    torch.manual_seed(0)
    models = step_models(spec, per_step, device, cuda, dtype)
    controlnet, optimizer = prepared_training(accelerator, models, tier, per_step, cfg.recipe.train)
    batches = StepBatches(spec, models, per_step, device)
    inputs = step_loss_inputs(controlnet, models, batches.empty_prompt, tier, device, dtype)
    run = StepRun(accelerator, controlnet, optimizer, inputs, batches, accum, per_step, tier.set_grads_to_none)
    seconds = run.timed(spec["warmup"], spec["steps"], cuda)
    out = {
        **spec,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "steps_per_s": spec["steps"] / seconds,
        "samples_per_s": spec["steps"] * spec["micro_batch"] * accum / seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }
    if cuda:
        out.update(cuda_peak_memory())
    return out


def step_tier(cfg, spec: dict, per_step: bool, cuda: bool):
    """``spec``'s tier as the step runs it: upstream's without the memory-format and compile
    switches, ``spec``'s switches on top, and on a CPU bf16 for fp16 (the CPU's half precision)."""
    upstream_off = {"channels_last": False, "compile": False} if per_step else {}
    half = {} if cuda or cfg.tiers[spec["tier"]].mixed_precision != "fp16" else {"mixed_precision": "bf16"}
    return cfg.tiers[spec["tier"]].model_copy(update={**half, **upstream_off, **spec.get("switches", {})})


def step_models(spec: dict, per_step: bool, device, cuda: bool, dtype) -> UNetModels:
    """The frozen UNet in the compute dtype on ``device`` and its ControlNet; upstream's step also
    has the VAE and the text encoder(s) there, run every step. With the cache the recipe's step
    never builds them: training does not need them. On a GPU the models are made there."""
    import torch

    # upstream's SDXL script encodes the captions once, but leaves both encoders on the GPU
    encoding = ("vae", *text_encoder_names(spec["arch"])) if per_step else ()
    models = build_unet_models(spec["arch"], spec["resolution"], ("scheduler", *encoding), device if cuda else None)
    models.unet.to(device, dtype)
    if per_step:
        for m in (models.vae, models.text_encoder, models.text_encoder_2):
            if m is not None:
                # upstream's SDXL VAE stays fp32 (its own VAE overflows in fp16) unless given the fp16-fixed one
                m.requires_grad_(False).eval().to(device, torch.float32 if models.sdxl and m is models.vae else dtype)
    return models


def prepared_training(accelerator, models: UNetModels, tier, per_step: bool, train) -> tuple:
    """The tier's model settings (the recipe's step: direct attention calls too), the ControlNet in
    training mode and its optimizer (upstream's AdamW as it comes; the recipe's fused), prepared."""
    from controlnet_recipe.training.memory import apply_model_settings, direct_attention_calls, make_optimizer, param_groups

    unet, controlnet = models.unet, models.controlnet
    apply_model_settings(unet, controlnet, tier)
    if not per_step:
        direct_attention_calls(unet, controlnet)
    controlnet.train()
    optimizer = make_optimizer(param_groups(controlnet, 1e-5, 1.0), tier, train, 1e-5, fused=None if per_step else True)
    return accelerator.prepare(controlnet, optimizer)


def _png(resolution: int, seed: int) -> bytes:
    """A random RGB image of ``resolution`` pixels a side, as PNG bytes."""
    import io

    import torch
    from PIL import Image

    size = (resolution, resolution, 3)
    arr = torch.randint(0, 256, size, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.numpy()).save(buf, format="PNG")
    return buf.getvalue()


class StepBatches:
    """A micro-batch of the step's columns per call: the recipe's from the latent cache (the
    conditioning images decoded once, as CachedPairs keeps them); upstream's decoded from PNG and
    encoded by the VAE (and SD's text encoder) every step. SDXL: the cache's pooled embedding and
    time ids (upstream's SDXL script encodes the captions once)."""

    def __init__(self, spec: dict, models: UNetModels, per_step: bool, device) -> None:
        import torch

        from controlnet_recipe.models import tiny

        res, micro = spec["resolution"], spec["micro_batch"]
        self.resolution, self.models, self.per_step, self.device = res, models, per_step, device
        down = 2 ** (len(models.vae_config["block_out_channels"]) - 1)  # the VAE's downsampling
        lat = (4, res // down, res // down)
        tiny_tokens = (tiny.MAX_TOKENS, tiny.TEXT_DIM)
        n_tokens, dim = tiny_tokens if spec["arch"] == "tiny" else (77, models.unet.config.cross_attention_dim)
        g = torch.Generator().manual_seed(0)
        self.image_pngs, self.cond_pngs = [_png(res, i) for i in range(micro)], [_png(res, 1000 + i) for i in range(micro)]
        self.ids = torch.randint(0, 1000, (micro, n_tokens), generator=g)
        self.cond_u8 = (self.decode(self.cond_pngs, False) * 255).round().to(torch.uint8)  # decoded once
        self.cached = {
            "latent_mean": torch.randn(micro, *lat, generator=g),
            "latent_std": torch.full((micro, *lat), 0.01),
            "text_embedding": torch.randn(micro, n_tokens, dim, generator=g),
        }
        self.empty_prompt = {"text_embedding": torch.zeros(1, n_tokens, dim)}
        self.sdxl_inputs = {}
        if models.sdxl:  # the pooled embedding and the time ids, as the cache stores them
            unet_cfg = models.unet.config
            pooled = unet_cfg.projection_class_embeddings_input_dim - 6 * unet_cfg.addition_time_embed_dim
            self.sdxl_inputs = {
                "pooled_embedding": torch.randn(micro, pooled, generator=g),
                "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * micro).float(),
            }
            self.empty_prompt["pooled_embedding"] = torch.zeros(1, pooled)

    def decode(self, pngs: list[bytes], normalize: bool):
        import io

        from PIL import Image

        from controlnet_recipe.core.images import images_to_tensor

        return images_to_tensor([Image.open(io.BytesIO(b)) for b in pngs], self.resolution, normalize=normalize)

    def __call__(self) -> dict:
        import torch

        if not self.per_step:
            return {**self.cached, **self.sdxl_inputs, "conditioning": self.cond_u8.float() / 255}
        pixels, cond = self.decode(self.image_pngs, True), self.decode(self.cond_pngs, False)  # upstream's loader, every step
        vae, device = self.models.vae, self.device
        with torch.no_grad():
            dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
            text = self.cached["text_embedding"] if self.models.sdxl else self.models.text_encoder(self.ids.to(device))[0]
        return {
            "latent_mean": dist.mean.float(),
            "latent_std": dist.std.float(),
            "text_embedding": text.float(),
            **self.sdxl_inputs,
            "conditioning": cond,
        }


def step_loss_inputs(controlnet, models: UNetModels, empty_prompt: dict, tier, device, dtype):
    """training/step.py's LossInputs for the SD or SDXL family's step."""
    from controlnet_recipe.models.families import FAMILIES
    from controlnet_recipe.objectives.diffusion import Objective
    from controlnet_recipe.training.step import LossInputs

    return LossInputs(
        controlnet=controlnet,
        denoiser=models.unet,
        scheduler=models.scheduler,
        empty_prompt=empty_prompt,
        scaling_factor=0.18215,
        p_empty=0.1,
        device=device,
        dtype=dtype,
        objective=Objective(),
        family=FAMILIES["sdxl" if models.sdxl else "sd"],
        channels_last=tier.channels_last,
    )


@dataclass
class StepRun:
    """The optimizer steps: ``accumulation`` micro-steps each, through accelerate."""

    accelerator: Any
    controlnet: Any
    optimizer: Any
    inputs: Any
    batches: StepBatches
    accumulation: int
    per_step: bool
    set_grads_to_none: bool

    def optimizer_step(self, step: int) -> None:
        import torch

        from controlnet_recipe.training.batches import step_generator
        from controlnet_recipe.training.step import controlnet_loss

        acc, accum = self.accelerator, self.accumulation
        total = torch.zeros((), device=acc.device)
        for m in range(accum):
            with acc.accumulate(self.controlnet):
                loss = controlnet_loss(self.inputs, self.batches(), step_generator(0, step, m, 0))
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.controlnet.parameters(), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=self.set_grads_to_none)
            if self.per_step:
                total += loss.item() / accum  # upstream reads the loss on every step
            else:
                total += loss.detach() / accum

    def timed(self, warmup: int, steps: int, cuda: bool) -> float:
        """``warmup`` optimizer steps, then the seconds that ``steps`` more take."""
        import torch

        for s in range(warmup):
            self.optimizer_step(s)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(steps):
            self.optimizer_step(warmup + s)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def parse_switch(kv: str) -> dict:
    """``channels_last=true`` -> {"channels_last": True}; ``mixed_precision=bf16`` -> {"mixed_precision": "bf16"}."""
    key, _, value = kv.partition("=")
    return {key: {"true": True, "false": False}.get(value.lower(), value)}


def run_child(spec: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        return {**spec, "error": (p.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1])


def median_round(rounds: list[dict]) -> dict:
    """The round with the median steps/s (an error if any round failed), with every round's steps/s."""
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    ranked = sorted(rounds, key=lambda r: r["steps_per_s"])
    return {**ranked[len(ranked) // 2], "steps_per_s_rounds": [r["steps_per_s"] for r in rounds]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--arch", nargs="+", default=["tiny", "sd21-base"], help="tiny, sd15, sd21-base, sdxl-base")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: 64 tiny, 128 full-size on CPU, 512 on GPU)")
    ap.add_argument(
        "--tiers",
        nargs="+",
        default=None,
        help="memory tiers of params.yaml to apply (default: cpu; sdxl-24gb for SDXL on a CPU)",
    )
    ap.add_argument("--switches", nargs="*", default=[], help="tier switches to measure alone, as key=value")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--effective-batch", type=int, default=None, help="default: 1 on CPU for full-size, else each tier's micro-batch"
    )
    ap.add_argument("--repeats", type=int, default=1, help="rounds of every variant, interleaved; each row is the median round")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    from controlnet_recipe.core.config import accumulation_steps, load_config

    cfg = load_config(ROOT / "params.yaml")
    cuda = torch.cuda.is_available()
    rows = []
    for arch in args.arch:
        res = args.resolution or (64 if arch == "tiny" else (1024 if arch.startswith("sdxl") else 512) if cuda else 128)
        sdxl_on_cpu = not cuda and arch.startswith("sdxl")  # fp32 SDXL training does not fit 24 GB of RAM
        for tier in args.tiers or (["sdxl-24gb"] if sdxl_on_cpu else ["cpu"]):
            micro = cfg.tiers[tier].batch_size
            if not cuda and arch != "tiny":
                micro = 1  # full-size on two CPU cores: one sample per step
            effective = args.effective_batch or micro
            micro, accum = accumulation_steps(effective, micro)
            variants = [("per-step encoding", {}), ("recipe", {})] + [
                ("recipe + " + kv, parse_switch(kv)) for kv in args.switches
            ]
            rounds: dict[str, list[dict]] = {mode: [] for mode, _ in variants}
            for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every variant
                for mode, switches in variants:
                    spec = dict(arch=arch, tier=tier, mode=mode, resolution=res, micro_batch=micro, accumulation=accum)
                    spec.update(steps=args.steps, warmup=args.warmup, switches=switches)
                    row = run_child(spec)
                    rounds[mode].append(row)
                    print(json.dumps(row), flush=True)
            rows += [median_round(rounds[mode]) for mode, _ in variants]
    print()
    mem = "peak_reserved_gb" if cuda else "peak_rss_gb"
    print(f"{'arch':<10} {'tier':<9} {'res':>4} {'batch':>7} {'mode':<36} {'steps/s':>8} {'samples/s':>9} {mem:>16}")
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:<10} {r['tier']:<9} {r['resolution']:>4} {'':>7} {r['mode']:<36} error: {r['error']}")
            continue
        batch = f"{r['micro_batch']}x{r['accumulation']}"
        print(
            f"{r['arch']:<10} {r['tier']:<9} {r['resolution']:>4} {batch:>7} {r['mode']:<36} {r['steps_per_s']:>8.3f} "
            f"{r['samples_per_s']:>9.2f} {r[mem]:>16.2f}"
        )
    print()
    for r in rows:
        ref = next(x for x in rows if x["mode"] == "per-step encoding" and (x["arch"], x["tier"]) == (r["arch"], r["tier"]))
        if r is ref or "error" in r or "error" in ref:
            continue
        print(
            f"{r['arch']} {r['tier']} {r['resolution']} px batch {r['micro_batch']}x{r['accumulation']}: {r['mode']} / "
            f"per-step encoding = {r['steps_per_s'] / ref['steps_per_s']:.2f}x steps/s, {r[mem] / ref[mem]:.2f}x {mem}"
        )


if __name__ == "__main__":
    main()
