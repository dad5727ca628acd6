"""The prepared GPU check: per tier, the peak allocated and reserved memory and samples/s of the
recipe's training step and of upstream's (per-step VAE/text encoding), side by side, each with the
planner's prediction beside it. Full-size architectures, random weights, one process.

    make gpu-check                      # on a GPU machine (carries .gpu-wheels if there: make gpu-wheels)
    python benchmarks/gpu_check.py --dry-run      # everything but CUDA, at a tiny size, on the CPU
    python benchmarks/gpu_check.py --predict-only # the predictions alone, written for the device run

Configurations: SD 2.1-base at 512 px on the SD tiers, SDXL-base at 1024 px on the SDXL tiers,
then FLUX.1-dev (the planner's Flux step, upstream's train_controlnet_flux.py computation) where
the planner says it fits the card, then the transformer families' tiers through the recipe's own
step (``--only transformers``: FLUX.1-dev at 512 px on flux-24gb, its validation, flux-40gb,
flux-80gb; SD3.5-medium at 1024 px on sd3-24gb, sd3-80gb). Each row's effective batch is its
micro-batch (no accumulation). Predictions are the planner's allocated peak (without its allocator
and context assumptions) and its full peak; they are computed here, or read from
benchmarks/results/gpu_check_plan.json when that file holds the same configurations (the device
has no time to spare for fake-tensor runs).

The transformer rows run training/step.py's controlnet_loss on the family's ControlNet
(models/families: make_controlnet), with training/memory.py's settings (fp8 frozen transformer,
gradient checkpointing) and optimizer (8-bit AdamW where the tier says), through accelerate as
training/trainer.py does (DeepSpeed ZeRO-2 with the CPU-offloaded optimizer on flux-24gb, one
process: DeepSpeed's CPU Adam compiles itself on first use; without DeepSpeed that row is
skipped). The flux-24gb validation runs training/validation.py's run_validation on the step row's
training state (the text encoders, at full size, stay on the CPU; the VAE comes to the GPU).
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from full_size import GIB, build_unet_models, compute_dtype, cuda_peak_memory, is_sdxl, timed_validation  # noqa: E402
from gpu_check_report import compare, table  # noqa: E402
from gpu_check_transformers import (  # noqa: E402
    TransformerRun,
    deepspeed_missing,
    run_transformer,
    run_transformer_validation,
    tiny_flux_folder,
    tiny_sd3_folder,
    transformer_recipe,
)

PLAN_FILE = ROOT / "benchmarks" / "results" / "gpu_check_plan.json"
MODES = ("per-step encoding", "recipe")  # upstream's step, then the recipe's

SD_TIERS = ["8gb", "12gb", "16gb", "24gb", "40gb", "80gb"]
SDXL_TIERS = ["sdxl-24gb", "sdxl-40gb", "sdxl-80gb"]
# Flux: upstream README_flux.md's run (512 px, bf16, 4 double + 0 single layers, no checkpointing,
# torch's AdamW), and 1024 px with gradient checkpointing.
FLUX = [
    dict(resolution=512, gradient_checkpointing=False, adam="foreach", per_step_encoding=True, label="upstream README_flux"),
    dict(resolution=1024, gradient_checkpointing=True, adam="fused", per_step_encoding=False, label="1024 px, checkpointing"),
]
# The transformer families through the recipe's own step, in the order they run: flux-24gb first
# (its step, then its validation on the step's training state), then the other small cards' tiers.
# The last row runs flux-80gb's step with cuDNN's attention on, as training/trainer.py leaves it
# (the other rows turn it off, as the Flux rows above: its backward failed on an H200 for Flux's
# shapes and the failure is sticky), so that whatever it does comes after everything else.
TRANSFORMER_ROWS = [
    ("flux", "flux-24gb", "recipe"),
    ("flux", "flux-24gb", "validation"),
    ("flux", "flux-40gb", "recipe"),
    ("sd3", "sd3-24gb", "recipe"),
    ("flux", "flux-80gb", "recipe"),
    ("sd3", "sd3-80gb", "recipe"),
    ("flux", "flux-80gb", "recipe, cuDNN attention"),
]
TRANSFORMER_ARCH = {"flux": ("flux1-dev", 512), "sd3": ("sd35-medium", 1024)}
# Other kinds of control through the same step (docs/adapters.md): the 16 GB card's LoRA kinds on a
# base in NF4, and the Control-LoRA on flux-40gb's fp8 base. (family, tier, adapter.kind, base.quantize)
ADAPTER_ROWS = [
    ("flux", "flux-16gb", "control_lora", "nf4"),
    ("flux", "flux-16gb", "controlnet_lora", "nf4"),
    ("flux", "flux-40gb", "control_lora", "none"),
]


def configs(dry: bool) -> list[dict]:
    """Every configuration to run, in order (SD first: the cheapest and the most used)."""
    if dry:
        sd = [("tiny", 64, t) for t in ("8gb", "80gb")]
        sdxl: list = []
        flux_arch, flux_res = str(tiny_flux_folder()), {512: 64, 1024: 128}
    else:
        sd = [("sd21-base", 512, t) for t in SD_TIERS]
        sdxl = [("sdxl-base", 1024, t) for t in SDXL_TIERS]
        flux_arch, flux_res = "flux1-dev", {512: 512, 1024: 1024}
    out = [dict(kind="unet", arch=a, resolution=r, tier=t, mode=m) for a, r, t in sd + sdxl for m in MODES]
    # the recipe's validation (training/validation.py: the pipeline, num_images per prompt under
    # guidance, the VAE decoding) with a training state of the tier's optimizer beside it
    if dry:
        validations = [("tiny", 64, "24gb", "demo")]
    else:
        validations = [
            ("sd21-base", 512, "24gb", "faces"),
            ("sd21-base", 512, "16gb", "faces"),
            ("sdxl-base", 1024, "sdxl-24gb", "sdxl"),
        ]
    # vae_slicing: make_pipeline decodes one image at a time on a GPU (validations measured before it did: false)
    out += [
        dict(kind="validation", arch=a, resolution=r, tier=t, mode="validation", recipe=n, vae_slicing=not dry)
        for a, r, t, n in validations
    ]
    for f in FLUX:
        fields = {**f, "resolution": flux_res[f["resolution"]]}
        out.append(dict(kind="flux", arch=flux_arch, tier="flux", mode=f["label"], **fields))
    # dry: tiny FLUX- and SD3-shaped folders, ControlNets of one block
    arch = {"flux": (str(tiny_flux_folder()), 64), "sd3": (str(tiny_sd3_folder()), 64)} if dry else TRANSFORMER_ARCH
    for fam, tier, mode in TRANSFORMER_ROWS:
        a, r = arch[fam]
        out.append(
            dict(kind="transformer", family=fam, recipe=fam, arch=a, resolution=r, tier=tier, mode=mode)
            | ({"controlnet_layers": 1} if dry else {})
        )
    for fam, tier, adapter, quantize in ADAPTER_ROWS:
        a, r = arch[fam]
        out.append(
            dict(kind="transformer", family=fam, recipe=fam, arch=a, resolution=r, tier=tier, mode="recipe")
            | dict(adapter=adapter, quantize=quantize)
            | ({"controlnet_layers": 1} if dry else {})
        )
    return out


def step_spec(c: dict, cfg, cuda: bool):
    """The planner's StepSpec for configuration ``c`` (what train_step.child or the Flux step runs)."""
    from controlnet_recipe.core.config import load_config
    from controlnet_recipe.planning.measure import StepSpec

    if c["kind"] == "flux":
        return StepSpec(
            arch=c["arch"],
            resolution=c["resolution"],
            micro_batch=1,
            mixed_precision="bf16",
            gradient_checkpointing=c["gradient_checkpointing"],
            adam=c["adam"],
            per_step_encoding=c["per_step_encoding"],
            set_grads_to_none=True,
        )
    from controlnet_recipe.planning.plan import step_spec as recipe_spec

    tier = cfg.tiers[c["tier"]]
    if c["kind"] == "transformer":
        # the tier as params.yaml has it, its micro-batch with no accumulation; validation: the
        # recipe's images per prompt after the step's training state
        recipe = transformer_recipe(c)
        images = recipe.train.validation.num_images if c["mode"] == "validation" else 1
        kw = dict(resolution=c["resolution"], micro_batch=tier.batch_size, accumulation=1, validation_images=images)
        return recipe_spec(recipe, tier, c["arch"], **kw)
    precision = tier.mixed_precision if cuda or tier.mixed_precision != "fp16" else "bf16"  # CPU: bf16 for fp16
    if c["kind"] == "validation":
        recipe = load_config(ROOT / "params.yaml", {"recipe": c["recipe"]}).recipe
        # what runs: the architecture's own VAE (SDXL's upcasts), slicing on a GPU as make_pipeline does
        vae = dict(vae_force_upcast=None, vae_slicing=c.get("vae_slicing", False))
        return recipe_spec(recipe, tier, c["arch"], resolution=c["resolution"], mixed_precision=precision, **vae)
    # train_step.child's step: the tier's micro-batch with no accumulation; upstream's AdamW as it comes
    upstream = c["mode"] == "per-step encoding"
    adam = "foreach" if upstream and not tier.use_8bit_adam else None
    return recipe_spec(
        cfg.recipe,
        tier,
        c["arch"],
        resolution=c["resolution"],
        micro_batch=tier.batch_size,
        accumulation=1,
        mixed_precision=precision,
        per_step_encoding=upstream,
        validation_images=1,  # the step alone is measured; validation's own rows are "validation"
        **({"adam": adam} if adam else {}),
    )


def predict(c: dict, cfg, cuda: bool) -> dict:
    from controlnet_recipe.planning.flops import step_flops
    from controlnet_recipe.planning.plan import plan_step

    use_8bit = c["kind"] != "flux" and cfg.tiers[c["tier"]].use_8bit_adam
    spec = step_spec(c, cfg, cuda)
    p = plan_step(spec, use_8bit_adam=use_8bit)
    if c["kind"] == "validation" or (c["kind"] == "transformer" and c["mode"] == "validation"):
        allocated = p.validation_peak_gib - p.validation_terms["allocator_overhead"] - p.validation_terms["cuda_context"]
        return {"predicted_allocated_gib": allocated, "predicted_peak_gib": p.validation_peak_gib, "fits_card": None}
    allocated = p.peak_gib - p.terms["allocator_overhead"] - p.terms["cuda_context"]
    flops = step_flops(spec)  # per sample: the step's own (upstream's counts its per-step encoding too)
    flops = {"flops_per_sample": flops["model"], "hardware_flops_per_sample": flops["hardware"], "dtype": spec.mixed_precision}
    return {"predicted_allocated_gib": allocated, "predicted_peak_gib": p.peak_gib, "fits_card": None, **flops}


def key(c: dict) -> str:
    return json.dumps({k: c[k] for k in sorted(c)}, sort_keys=True)


def run_unet(c: dict, steps: int, warmup: int) -> dict:
    import train_step

    from controlnet_recipe.core.config import load_config

    micro = load_config(ROOT / "params.yaml").tiers[c["tier"]].batch_size
    spec = dict(arch=c["arch"], tier=c["tier"], mode=c["mode"], resolution=c["resolution"], micro_batch=micro, accumulation=1)
    spec.update(steps=steps, warmup=warmup, switches={})
    return train_step.child(spec)


def run_flux(c: dict, cfg, cuda: bool, steps: int, warmup: int) -> dict:
    """The planner's Flux step on real tensors: its allocations and its speed."""
    import contextlib

    import torch

    from controlnet_recipe.models.families.flux import FluxMeasured

    spec = step_spec(c, cfg, cuda)
    device = torch.device("cuda" if cuda else "cpu")
    # cuDNN's fused attention backward failed on an H200 (torch 2.11+cu130: "mha_graph.execute ...
    # is_good()", then an illegal memory access) for Flux's shapes; flash attention runs them.
    torch.backends.cuda.enable_cudnn_sdp(False)
    with torch.device(device) if cuda else contextlib.nullcontext():
        m = FluxMeasured(spec, validation_models=False)
        m.device_type = device.type
        m.set_switches()
        params = [p for p in m.controlnet.parameters() if p.requires_grad]
        kw = {"fused": True} if spec.adam == "fused" else {"foreach": True}
        opt = torch.optim.AdamW(params, lr=1e-5, **kw)

        seconds = 0.0
        for i in range(warmup + steps):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            loss = m.training_loss()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    out = {"steps_per_s": steps / seconds, "samples_per_s": steps * spec.micro_batch / seconds, "micro_batch": 1}
    if cuda:
        out.update(cuda_peak_memory())
    return out


def run_recipe_validation(c: dict, cfg, cuda: bool) -> dict:
    """The train stage's validation on full-size random weights: the frozen base in the tier's
    dtype, the ControlNet in fp32 with its optimizer's state (gradients set to None), then
    training/validation.py's run_validation with the recipe's images per prompt (2 denoising
    steps: memory does not grow with them). Peak allocated and reserved during validation."""
    import torch
    from PIL import Image

    from controlnet_recipe.core.config import load_config
    from controlnet_recipe.training.validation import ValidationPairs

    recipe = load_config(ROOT / "params.yaml", {"recipe": c["recipe"]}).recipe
    spec = step_spec(c, cfg, cuda)
    tier = cfg.tiers[c["tier"]].model_copy(update={"mixed_precision": spec.mixed_precision})
    device = torch.device("cuda" if cuda else "cpu")
    res = c["resolution"]
    parts = ("vae", "text_encoder", "scheduler", *(("text_encoder_2",) if is_sdxl(c["arch"]) else ()))
    models = build_unet_models(c["arch"], res, parts, device if cuda else None)
    base = _validation_base(models, device, compute_dtype(tier.mixed_precision))
    controlnet = models.controlnet
    optimizer = _stepped_optimizer(controlnet, tier, recipe.train)  # its state held through validation
    v = recipe.train.validation.model_copy(update={"num_inference_steps": 2})
    pairs = ValidationPairs([Image.new("RGB", (res, res))], ["a photo of a face"])
    out = timed_validation(base, controlnet, pairs, v, res, cuda)
    del optimizer  # held until the peaks are read, as the train stage holds it
    return out


def _validation_base(models, device, dtype):
    """The base's components as the train stage holds them between validations: the frozen UNet
    in ``dtype`` on ``device``, the VAE and text encoder(s) on the CPU; a tiny tokenizer as long
    as the text encoder's positions."""
    from controlnet_recipe.models import tiny
    from controlnet_recipe.models.families.family import BaseComponents

    tok = tiny.build_tokenizer(["a", "photo", "of", "face"], Path(tempfile.mkdtemp()))
    tok.model_max_length = models.text_encoder.config.max_position_embeddings  # 77 for the real encoders
    sdxl = models.text_encoder_2 is not None
    base = BaseComponents(
        family="sdxl" if sdxl else "sd",
        tokenizer=tok,
        text_encoder=models.text_encoder,
        vae=models.vae,
        denoiser=models.unet.requires_grad_(False).to(device, dtype),
        noise_scheduler=models.scheduler,
        tokenizer_2=tok if sdxl else None,
        text_encoder_2=models.text_encoder_2,
        options={"force_zeros_for_empty_prompt": True} if sdxl else {},
    )
    for m in (base.vae, *base.text_encoders):
        m.requires_grad_(False).to("cpu")  # where the train stage keeps them between validations
    return base


def _stepped_optimizer(controlnet, tier, train):
    """The tier's optimizer for ``controlnet`` with its state, as after a training step; the
    gradients then set to None, or zeroed where the tier keeps them (16gb: through validation)."""
    import torch

    from controlnet_recipe.training.memory import make_optimizer, param_groups

    opt = make_optimizer(param_groups(controlnet, 1e-5, 1.0), tier, train, 1e-5)
    for p in controlnet.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=tier.set_grads_to_none)
    return opt


def fresh_state() -> None:
    """Between configurations: nothing of the last one left on the GPU or in accelerate's state."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def parse_args() -> argparse.Namespace:
    """The command line's options (the module's docstring as its help)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: everything but CUDA")
    ap.add_argument("--predict-only", action="store_true", help=f"write the predictions to {PLAN_FILE.name} and stop")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json (default: $OUT, else benchmarks/results)")
    ap.add_argument(
        "--only",
        choices=("unet", "flux", "validation", "transformers"),
        default=None,
        help="only the UNet (SD, SDXL) steps, the Flux steps, the validations, or the transformer families' tiers "
        "through the recipe's step (their validation too)",
    )
    ap.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        default=None,
        help=f"measured gpu_check JSON files: their rows against the predictions ({PLAN_FILE.name}'s where it has them, "
        "else computed now), with TFLOP/s and MFU on the card that measured them",
    )
    ap.add_argument("--time-budget", type=float, default=400.0, help="seconds; configurations past it are skipped")
    return ap.parse_args()


def predictions_for(todo: list[dict], known: dict, cfg, cuda: bool) -> dict:
    """Each configuration's prediction by its key: from the predictions file when it has it, else computed."""
    predictions = {}
    for c in todo:
        k, validation = key(c), c["kind"] == "validation" or c.get("mode") == "validation"
        current = known.get(k) if known.get(k) and (validation or "flops_per_sample" in known[k]) else None
        predictions[k] = current or predict(c, cfg, cuda)  # a file from before the FLOP count: counted now
    return predictions


def write_device_predictions(predictions: dict, known: dict) -> None:
    """The device configurations' predictions to PLAN_FILE (with --only, the others' stay as they were)."""
    device_keys = [key(c) for c in configs(dry=False)]
    predictions = {k: predictions.get(k) or known[k] for k in device_keys if k in predictions or k in known}
    PLAN_FILE.write_text(json.dumps(predictions, indent=1))
    print(f"gpu_check: {len(predictions)} predictions written to {PLAN_FILE}")


def skip_reason(c: dict, pred: dict, cfg, total_gib: float | None, over_budget: bool) -> str | None:
    """Why configuration ``c`` is not run (None: it is): predicted past the card, the time budget
    spent, or DeepSpeed missing for a tier that needs it."""
    if total_gib is not None and pred["predicted_peak_gib"] > total_gib:
        return f"predicted {pred['predicted_peak_gib']:.1f} GiB > {total_gib:.0f} GiB"
    if over_budget:
        return "time budget"
    if c["kind"] == "transformer":
        return deepspeed_missing(c, cfg)
    return None


def validates_held(held: TransformerRun | None, c: dict) -> bool:
    """Whether ``c`` is the validation row of the held training state's tier and architecture."""
    if held is None or c["kind"] != "transformer" or c["mode"] != "validation":
        return False
    return (held.c["tier"], held.c["arch"]) == (c["tier"], c["arch"])


def keeps_state(c: dict, following: dict) -> bool:
    """Whether a transformer step row's training state is kept for the validation row after it."""
    keep = c["kind"] == "transformer" and c["mode"] == "recipe" and following.get("mode") == "validation"
    return keep and all(following.get(k) == c[k] for k in ("kind", "tier", "arch"))


def run_one(
    c: dict, cfg, cuda: bool, steps: int, warmup: int, held: TransformerRun | None, keep: bool
) -> tuple[dict, TransformerRun | None]:
    """Configuration ``c``'s measurements (or its error: one configuration's failure, an OOM, must
    not lose the others) and the training state kept for the next row (a validation row uses ``held`` up)."""
    try:
        if c["kind"] == "flux":
            return run_flux(c, cfg, cuda, steps, warmup), None
        if c["kind"] == "validation":
            return run_recipe_validation(c, cfg, cuda), None
        if c["kind"] == "transformer" and c["mode"] == "validation":
            return run_transformer_validation(c, cfg, cuda, held), None
        if c["kind"] == "transformer":
            return run_transformer(c, cfg, cuda, steps, warmup, keep=keep)
        return run_unet(c, steps, warmup), None
    except Exception as e:
        traceback.print_exc(limit=-6)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}, None


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def measured_row(c: dict, pred: dict, got: dict, t0: float) -> dict:
    """The configuration, its prediction and its measurements (with predicted/measured and
    reserved/allocated where a peak was measured), and its seconds since ``t0``."""
    row = {**c, **pred, **{k: v for k, v in got.items() if k not in c}, "seconds": time.perf_counter() - t0}
    if row.get("flops_per_sample") and row.get("samples_per_s"):  # model FLOPs utilisation against the card's peak
        from controlnet_recipe.planning.flops import mfu

        row["tflops"] = row["samples_per_s"] * row["flops_per_sample"] / 1e12
        row["mfu"] = mfu(row["samples_per_s"], row["flops_per_sample"], device_name(), row["dtype"])
    if "peak_allocated_gb" in row:
        row["predicted_over_measured"] = row["predicted_allocated_gib"] / row["peak_allocated_gb"]
        row["reserved_over_allocated"] = row["peak_reserved_gb"] / row["peak_allocated_gb"]
    return row


def run_all(
    todo: list[dict], predictions: dict, cfg, cuda: bool, total_gib: float | None, t_start: float, budget: float
) -> list[dict]:
    """Every configuration in order, each printed as it is measured (or skipped); a transformer step
    row's training state is held for its validation row, everything else released between rows.
    Configurations that start past ``budget`` seconds after ``t_start`` are skipped."""
    steps, warmup = (4, 2) if cuda else (1, 1)
    rows = []
    held = None  # a transformer step row's training state, for the validation row after it
    for i, c in enumerate(todo):
        pred = predictions[key(c)]
        validates = validates_held(held, c)
        if held is not None and not validates:
            held.close()
            held = None
        skip = skip_reason(c, pred, cfg, total_gib, time.perf_counter() - t_start > budget)
        if skip:
            rows.append({**c, **pred, "skipped": skip})
            continue
        if not validates:
            fresh_state()
        keep = keeps_state(c, todo[i + 1] if i + 1 < len(todo) else {})
        t0 = time.perf_counter()
        got, held = run_one(c, cfg, cuda, steps, warmup, held, keep)
        rows.append(measured_row(c, pred, got, t0))
        print(json.dumps(rows[-1]), flush=True)
    if held is not None:
        held.close()
    return rows


def write_results(rows: list[dict], device: str, total_gib: float | None, dry: bool, out: Path | None, t_start: float) -> None:
    """The table, then the rows as JSON in ``out`` (default: $OUT, else benchmarks/results)."""
    print()
    print(f"device: {device}" + (f", {total_gib:.0f} GiB" if total_gib else ""))
    print(table(rows, dry))
    out_dir = out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_dry_run.json" if dry else "gpu_check.json"
    (out_dir / name).write_text(json.dumps({"device": device, "total_gib": total_gib, "rows": rows}, indent=1))
    print(f"gpu_check: {len(rows)} configurations in {time.perf_counter() - t_start:.0f} s; {out_dir / name}")


def main() -> None:
    """Predict, then measure every configuration (or compare measured files, or write the predictions)."""
    args = parse_args()
    t_start = time.perf_counter()

    import torch

    from controlnet_recipe.core.config import load_config

    if args.compare:
        cfg = load_config(ROOT / "params.yaml")
        known = json.loads(PLAN_FILE.read_text()) if PLAN_FILE.is_file() else {}
        compare(args.compare, lambda c: predictions_for([c], known, cfg, True)[key(c)])
        return
    if args.predict_only and args.dry_run:
        sys.exit("gpu_check: --predict-only writes the device configurations' predictions: not with --dry-run")
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not (args.dry_run or args.predict_only):
        sys.exit("gpu_check: no CUDA device (use --dry-run to check the script on a CPU)")
    cfg = load_config(ROOT / "params.yaml")
    only = {"transformers": "transformer"}.get(args.only, args.only)
    todo = [c for c in configs(args.dry_run) if only in (None, c["kind"])]
    known = json.loads(PLAN_FILE.read_text()) if PLAN_FILE.is_file() and not args.dry_run else {}
    predictions = predictions_for(todo, known, cfg, cuda or args.predict_only)
    if args.predict_only:
        write_device_predictions(predictions, known)
        return
    print(f"gpu_check: predictions ready after {time.perf_counter() - t_start:.0f} s", flush=True)

    device = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    total = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None
    rows = run_all(todo, predictions, cfg, cuda, total, t_start, args.time_budget)
    write_results(rows, device, total, args.dry_run, args.out, t_start)


if __name__ == "__main__":
    main()
