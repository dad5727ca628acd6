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

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

PLAN_FILE = ROOT / "benchmarks" / "results" / "gpu_check_plan.json"
GIB = 1024**3
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
    return out


def tiny_flux_folder() -> Path:
    """A two-block FLUX-shaped model's configs (the dry run's stand-in for FLUX.1-dev)."""
    folder = Path(tempfile.gettempdir()) / "controlnet-recipe-tiny-flux"
    configs_ = {
        "transformer": {
            "_class_name": "FluxTransformer2DModel",
            "attention_head_dim": 16,
            "guidance_embeds": True,
            "in_channels": 64,
            "joint_attention_dim": 32,
            "num_attention_heads": 2,
            "num_layers": 1,
            "num_single_layers": 1,
            "patch_size": 1,
            "pooled_projection_dim": 32,
            "axes_dims_rope": [4, 6, 6],
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            "block_out_channels": [8, 8, 8, 8],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "latent_channels": 16,
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        "text_encoder": {
            "model_type": "clip_text_model",
            "vocab_size": 1000,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "projection_dim": 32,
        },
        "text_encoder_2": {
            "model_type": "t5",
            "vocab_size": 1000,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 1,
            "num_heads": 2,
            "feed_forward_proj": "gated-gelu",
            "is_gated_act": True,
        },
    }
    for name, cfg in configs_.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(cfg))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxControlNetPipeline"}))
    _write_scheduler(folder, dynamic_shifting=True)
    return folder


def tiny_sd3_folder() -> Path:
    """A two-block SD3-shaped model's configs (the dry run's stand-in for SD3.5-medium): both CLIPs'
    features together as wide as T5's, the VAE's 16 latent channels."""
    folder = Path(tempfile.gettempdir()) / "controlnet-recipe-tiny-sd3"
    clip = {
        "model_type": "clip_text_model",
        "vocab_size": 1000,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "projection_dim": 16,
    }
    configs_ = {
        "transformer": {
            "_class_name": "SD3Transformer2DModel",
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "caption_projection_dim": 32,
            "pooled_projection_dim": 32,
            "pos_embed_max_size": 16,
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            "block_out_channels": [8, 8, 8, 8],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "latent_channels": 16,
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "scaling_factor": 1.5305,
            "shift_factor": 0.0609,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        "text_encoder": clip,
        "text_encoder_2": clip,
        "text_encoder_3": {
            "model_type": "t5",
            "vocab_size": 1000,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 1,
            "num_heads": 2,
            "feed_forward_proj": "gated-gelu",
            "is_gated_act": True,
        },
    }
    for name, cfg in configs_.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(cfg))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3ControlNetPipeline"}))
    _write_scheduler(folder, dynamic_shifting=False)
    return folder


def _write_scheduler(folder: Path, dynamic_shifting: bool) -> None:
    """models/tiny.py's flow-matching scheduler config (Flux's dynamic shifting, or SD3's shift 3)."""
    cfg = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 1.0 if dynamic_shifting else 3.0,
        "use_dynamic_shifting": dynamic_shifting,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))


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


def transformer_recipe(c: dict):
    """The recipe block ``c`` names (params.yaml's flux, sd3) at ``c``'s resolution (the dry run:
    with ControlNets of ``controlnet_layers`` blocks)."""
    from controlnet_recipe.core.config import load_config

    recipe = load_config(ROOT / "params.yaml", {"recipe": c["recipe"]}).recipe
    train = {"controlnet_layers": c["controlnet_layers"]} if "controlnet_layers" in c else {}
    return recipe.model_copy(
        update={
            "data": recipe.data.model_copy(update={"resolution": c["resolution"]}),
            "train": recipe.train.model_copy(update=train),
        }
    )


def predict(c: dict, cfg, cuda: bool) -> dict:
    from controlnet_recipe.planning.plan import plan_step

    use_8bit = c["kind"] != "flux" and cfg.tiers[c["tier"]].use_8bit_adam
    p = plan_step(step_spec(c, cfg, cuda), use_8bit_adam=use_8bit)
    if c["kind"] == "validation" or (c["kind"] == "transformer" and c["mode"] == "validation"):
        allocated = p.validation_peak_gib - p.validation_terms["allocator_overhead"] - p.validation_terms["cuda_context"]
        return {"predicted_allocated_gib": allocated, "predicted_peak_gib": p.validation_peak_gib, "fits_card": None}
    allocated = p.peak_gib - p.terms["allocator_overhead"] - p.terms["cuda_context"]
    return {"predicted_allocated_gib": allocated, "predicted_peak_gib": p.peak_gib, "fits_card": None}


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

    from controlnet_recipe.planning import measure

    spec = step_spec(c, cfg, cuda)
    device = torch.device("cuda" if cuda else "cpu")
    # cuDNN's fused attention backward failed on an H200 (torch 2.11+cu130: "mha_graph.execute ...
    # is_good()", then an illegal memory access) for Flux's shapes; flash attention runs them.
    torch.backends.cuda.enable_cudnn_sdp(False)
    with torch.device(device) if cuda else contextlib.nullcontext():
        m = measure._FluxModels(spec, validation_models=False)
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
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GIB
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GIB
    return out


def run_recipe_validation(c: dict, cfg, cuda: bool) -> dict:
    """The train stage's validation on full-size random weights: the frozen base in the tier's
    dtype, the ControlNet in fp32 with its optimizer's state (gradients set to None), then
    training/validation.py's run_validation with the recipe's images per prompt (2 denoising
    steps: memory does not grow with them). Peak allocated and reserved during validation."""
    import contextlib

    import torch
    from PIL import Image

    from controlnet_recipe.core.config import load_config
    from controlnet_recipe.models import architectures, tiny
    from controlnet_recipe.models.families import family_of_architecture
    from controlnet_recipe.models.families.family import BaseComponents
    from controlnet_recipe.training.memory import make_optimizer, param_groups
    from controlnet_recipe.training.step import controlnet_from_unet
    from controlnet_recipe.training.validation import ValidationPairs, run_validation

    recipe = load_config(ROOT / "params.yaml", {"recipe": c["recipe"]}).recipe
    spec = step_spec(c, cfg, cuda)
    tier = cfg.tiers[c["tier"]].model_copy(update={"mixed_precision": spec.mixed_precision})
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tier.mixed_precision, torch.float32)
    device = torch.device("cuda" if cuda else "cpu")
    res = c["resolution"]
    with torch.device(device) if cuda else contextlib.nullcontext():
        if c["arch"] == "tiny":
            parts = {"unet": tiny.build_unet(res), "vae": tiny.build_vae(res), "text_encoder": tiny.build_text_encoder(1000)}
            parts["scheduler"] = tiny.build_scheduler()
        else:
            sdxl = family_of_architecture(c["arch"]) == "sdxl"
            names = ("unet", "vae", "text_encoder", "scheduler", *(("text_encoder_2",) if sdxl else ()))
            parts = architectures.build(c["arch"], names)
        controlnet = controlnet_from_unet(parts["unet"], parts["vae"].config).to(device)
    tok = tiny.build_tokenizer(["a", "photo", "of", "face"], Path(tempfile.mkdtemp()))
    tok.model_max_length = parts["text_encoder"].config.max_position_embeddings  # 77 for the real encoders
    sdxl = "text_encoder_2" in parts
    base = BaseComponents(
        family="sdxl" if sdxl else "sd",
        tokenizer=tok,
        text_encoder=parts["text_encoder"],
        vae=parts["vae"],
        denoiser=parts["unet"].requires_grad_(False).to(device, dtype),
        noise_scheduler=parts["scheduler"],
        tokenizer_2=tok if sdxl else None,
        text_encoder_2=parts.get("text_encoder_2"),
        options={"force_zeros_for_empty_prompt": True} if sdxl else {},
    )
    for m in (base.vae, *base.text_encoders):
        m.requires_grad_(False).to("cpu")  # where the train stage keeps them between validations
    opt = make_optimizer(param_groups(controlnet, 1e-5, 1.0), tier, recipe.train, 1e-5)
    for p in controlnet.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # the optimizer's state, as after a training step
    opt.zero_grad(set_to_none=tier.set_grads_to_none)  # 16gb keeps them (zeroed) through validation
    v = recipe.train.validation.model_copy(update={"num_inference_steps": 2})
    pairs = ValidationPairs([Image.new("RGB", (res, res))], ["a photo of a face"])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_validation(base, controlnet, pairs, v, res, 0)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"samples_per_s": v.num_images / seconds, "micro_batch": v.num_images, "validation_images": v.num_images}
    if cuda:
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GIB
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GIB
    return out


class TransformerRun:
    """One transformer tier's training as training/trainer.py sets it up, on random weights: the
    frozen transformer in the tier's dtype (built on the GPU: 12B random weights on the CPU take
    minutes), the family's ControlNet made from it where the trainer makes it (the CPU), the
    tier's model settings, optimizer and learning-rate schedule, all through accelerate (with
    DeepSpeed's plugin where the tier names it), and a cached batch of the family's columns."""

    def __init__(self, c: dict, cfg, cuda: bool):
        from controlnet_recipe.models.architectures import folder_of
        from controlnet_recipe.models.families import FAMILIES

        self.c, self.cuda, self.recipe = c, cuda, transformer_recipe(c)
        self.t = self.recipe.train
        self.tier = cfg.tiers[c["tier"]]
        self.family = FAMILIES[c["family"]]
        self.folder = folder_of(c["arch"])
        self.zero = self.tier.deepspeed is not None
        self.environ, self.acc = dict(os.environ), None
        try:
            self._setup(c, cfg, cuda)
        except BaseException:
            self.close()
            raise
        self.steps_done = 0

    def _setup(self, c: dict, cfg, cuda: bool) -> None:
        import contextlib

        import diffusers
        import torch
        from accelerate import Accelerator, PartialState
        from diffusers.optimization import get_scheduler

        from controlnet_recipe.models.families.family import POOLED, TEXT, BaseComponents
        from controlnet_recipe.training.memory import (
            apply_model_settings,
            deepspeed_plugin,
            direct_attention_calls,
            make_optimizer,
            param_groups,
        )
        from controlnet_recipe.training.step import LossInputs, objective

        t, tier, fam, folder = self.t, self.tier, self.family, self.folder
        if self.zero:
            # one process, as `accelerate launch` would start it on a one-GPU machine
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ["MASTER_PORT"] = str(_free_port())
            if not cuda:  # as the trainer: without a GPU, gloo joins DeepSpeed's ranks
                PartialState(backend="gloo")
        # cuDNN's fused attention backward failed on an H200 (run_flux); "cuDNN attention" rows leave it on
        self.cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp("cuDNN" in c["mode"])
        micro = self.micro = tier.batch_size
        self.acc = acc = Accelerator(
            mixed_precision=tier.mixed_precision,
            gradient_accumulation_steps=1,
            deepspeed_plugin=deepspeed_plugin(tier, 1, micro, t.max_grad_norm),
            cpu=not cuda and not self.zero,
        )
        device = self.device = acc.device
        dtype = self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tier.mixed_precision, torch.float32)
        torch.manual_seed(t.seed)
        cls = getattr(diffusers, json.loads((folder / "transformer" / "config.json").read_text())["_class_name"])
        self.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
            diffusers.FlowMatchEulerDiscreteScheduler.load_config(folder / "scheduler")
        )
        self.max_sequence_length = fam.sequence_length(self.recipe.base.max_sequence_length)
        with torch.device(device) if cuda else contextlib.nullcontext():
            denoiser = _built_in(dtype, lambda: cls.from_config(cls.load_config(folder / "transformer")))
            denoiser.requires_grad_(False).eval()
            shell = BaseComponents(c["family"], None, None, None, denoiser, self.scheduler)
            controlnet = fam.make_controlnet(shell, t)  # fp32, as from the trainer's fp32 base
        controlnet.to("cpu")  # where the trainer makes it: prepare moves it
        self.denoiser = denoiser.to(device, dtype)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        apply_model_settings(denoiser, controlnet, tier, dtype)
        direct_attention_calls(denoiser, controlnet)
        controlnet.train()
        lr = t.learning_rate
        optimizer = make_optimizer(param_groups(controlnet, lr, t.new_layers_lr_multiplier, fam.new_layers), tier, t, lr)
        lr_scheduler = get_scheduler(
            t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=1000
        )
        self.controlnet, self.optimizer, self.lr_scheduler = acc.prepare(controlnet, optimizer, lr_scheduler)
        # the frozen transformer comes to the GPU in the compute dtype before layerwise casting
        # stores it in fp8 (training/trainer.py's order): the setup's peak
        self.setup_peak_gb = torch.cuda.max_memory_allocated() / GIB if cuda else None

        vae = json.loads((folder / "vae" / "config.json").read_text())
        down = 2 ** (len(vae["block_out_channels"]) - 1)
        lat, ch = c["resolution"] // down, vae.get("latent_channels", 16)
        tokens = self.max_sequence_length + (77 if c["family"] == "sd3" else 0)  # SD3: CLIP's 77, then T5's
        dim, pooled = denoiser.config.joint_attention_dim, denoiser.config.pooled_projection_dim
        g = torch.Generator().manual_seed(0)
        # the latent cache's columns (training/batches.py: float32 on the CPU, moved by the step)
        self.batch = {
            "latent_mean": torch.randn(micro, ch, lat, lat, generator=g),
            "latent_std": torch.full((micro, ch, lat, lat), 0.01),
            "control_mean": torch.randn(micro, ch, lat, lat, generator=g),
            "control_std": torch.full((micro, ch, lat, lat), 0.01),
            TEXT: torch.randn(micro, tokens, dim, generator=g),
            POOLED: torch.randn(micro, pooled, generator=g),
            "conditioning": torch.rand(micro, 3, c["resolution"], c["resolution"], generator=g),
        }
        self.inputs = LossInputs(
            controlnet=self.controlnet,
            denoiser=denoiser,
            scheduler=self.scheduler,
            empty_prompt={TEXT: torch.zeros(1, tokens, dim), POOLED: torch.zeros(1, pooled)},
            scaling_factor=vae.get("scaling_factor", 1.0),
            shift_factor=vae.get("shift_factor") or 0.0,
            p_empty=t.proportion_empty_prompts,
            device=device,
            dtype=dtype,
            objective=objective(t),
            family=fam,
            channels_last=tier.channels_last,
        )

    def step(self):
        """Trainer.train_step with one micro-batch: the loss, backward, clipping, optimizer."""
        from controlnet_recipe.training.batches import step_generator
        from controlnet_recipe.training.step import controlnet_loss

        acc = self.acc
        with acc.accumulate(self.controlnet):
            loss = controlnet_loss(self.inputs, self.batch, step_generator(self.t.seed, self.steps_done, 0, 0))
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.controlnet.parameters(), self.t.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=self.tier.set_grads_to_none)
        self.steps_done += 1
        return loss.detach()

    def close(self) -> None:
        """Everything released: the models, accelerate's references, the environment as it was."""
        import torch

        if not self.__dict__:  # closed already
            return
        environ, cudnn_sdp = self.environ, getattr(self, "cudnn_sdp", None)
        if cudnn_sdp is not None:
            torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
        if self.acc is not None:
            self.acc.free_memory()
        self.__dict__.clear()
        # DeepSpeed's process group stays (DeepSpeed keeps its groups for the process: a second
        # engine reuses them); without the launcher's variables later rows' accelerate ignores it
        os.environ.clear()
        os.environ.update(environ)
        gc.collect()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _built_in(dtype, builder):
    """A model built with ``dtype`` as the default (its random weights made in it, not cast after)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return builder()
    finally:
        torch.set_default_dtype(old)


def _layerwise_compute_dtype(model, dtype) -> None:
    """The dtype diffusers' layerwise casting (frozen_fp8) upcasts ``model``'s layers to."""
    for m in model.modules():
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        if hook is not None:
            hook.compute_dtype = dtype


def deepspeed_missing(c: dict, cfg) -> str | None:
    """Why a DeepSpeed tier's row cannot run here (None: it can)."""
    if cfg.tiers[c["tier"]].deepspeed is None:
        return None
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # not installed, or a requirement of it missing
        return f"DeepSpeed is not importable ({type(e).__name__}: {str(e)[:80]}): make gpu-wheels"
    try:  # its CPU Adam op compiles itself with ninja: the python's own ninja, found on PATH
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    return None


def run_transformer(c: dict, cfg, cuda: bool, steps: int, warmup: int, keep: bool = False) -> tuple[dict, object]:
    """The recipe's training step on a transformer tier: ``warmup`` then ``steps`` timed optimizer
    steps; peak allocated and reserved over the steps (the setup's peak beside them). ``keep``: the
    training state is handed back (for the validation row), else released."""
    import torch

    run = TransformerRun(c, cfg, cuda)
    try:
        out = {"setup_peak_allocated_gb": run.setup_peak_gb} if cuda else {}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            run.step()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = [run.step() for _ in range(steps)]
        loss = float(torch.stack(losses).float().mean())  # the one host sync
        seconds = time.perf_counter() - t0
        if not loss == loss:  # NaN
            raise RuntimeError("the loss is NaN")
        out.update(steps_per_s=steps / seconds, samples_per_s=steps * run.micro / seconds, micro_batch=run.micro, loss=loss)
        out["deepspeed"] = run.zero
        if cuda:
            out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GIB
            out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GIB
    except BaseException:
        run.close()
        raise
    if not keep:
        run.close()
        run = None
    return out, run


def run_transformer_validation(c: dict, cfg, cuda: bool, run=None) -> dict:
    """training/validation.py's run_validation on a transformer tier's training state (``run``, the
    step row's; else one made here, after one training step): the recipe's images per prompt, 2
    denoising steps. The text encoders, full size, stay on the CPU where the trainer keeps them
    (FlowFamily.validation_inputs encodes the prompt there); the VAE comes to the GPU. Peak
    allocated and reserved during validation; samples/s over its wall time (CPU encoding included)."""
    import contextlib

    import diffusers
    import torch
    import transformers
    from PIL import Image

    from controlnet_recipe.models import tiny
    from controlnet_recipe.models.families.family import BaseComponents
    from controlnet_recipe.training.validation import ValidationPairs, run_validation

    if run is None:
        _, run = run_transformer(c, cfg, cuda, steps=1, warmup=0, keep=True)
    try:
        folder, res = run.folder, c["resolution"]
        encoders = {  # name: class; the config in the folder's subfolder of that name
            "flux": {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"},
            "sd3": {
                "text_encoder": "CLIPTextModelWithProjection",
                "text_encoder_2": "CLIPTextModelWithProjection",
                "text_encoder_3": "T5EncoderModel",
            },
        }[c["family"]]
        parts = {}
        # built on the GPU in the compute dtype (random init of T5-XXL's 4.7B weights on the CPU is
        # slow), then kept on the CPU in fp32 as the trainer loads them
        with torch.device(run.device) if cuda else contextlib.nullcontext():
            for name, cls_name in encoders.items():
                cls = getattr(transformers, cls_name)
                config = cls.config_class.from_pretrained(folder / name)
                parts[name] = _built_in(run.dtype, lambda cls=cls, config=config: cls(config)).requires_grad_(False).eval()
            vae_cls = diffusers.AutoencoderKL
            parts["vae"] = _built_in(run.dtype, lambda: vae_cls.from_config(vae_cls.load_config(folder / "vae")))
        for m in parts.values():
            m.requires_grad_(False).eval().to("cpu", torch.float32)
        tok = tiny.build_tokenizer(["a", "photo", "of", "face"], Path(tempfile.mkdtemp()))
        tok.model_max_length = 77  # CLIP's; T5 reads base.max_sequence_length
        base = BaseComponents(
            family=c["family"],
            tokenizer=tok,
            text_encoder=parts["text_encoder"],
            vae=parts["vae"],
            denoiser=run.denoiser,
            noise_scheduler=run.scheduler,
            tokenizer_2=tok,
            text_encoder_2=parts["text_encoder_2"],
            tokenizer_3=tok if "text_encoder_3" in parts else None,
            text_encoder_3=parts.get("text_encoder_3"),
            max_sequence_length=run.max_sequence_length,
        )
        v = run.t.validation.model_copy(update={"num_inference_steps": 2})
        pairs = ValidationPairs([Image.new("RGB", (res, res))], ["a photo of a face"])
        controlnet = run.acc.unwrap_model(run.controlnet)
        if not cuda:  # run_validation computes in fp32 on a CPU (it casts the denoiser): the dry run's parts too
            controlnet.float()  # DeepSpeed holds it in bf16
            _layerwise_compute_dtype(run.denoiser, torch.float32)  # frozen_fp8's layers compute in bf16
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run_validation(base, controlnet, pairs, v, res, 0)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out = {"samples_per_s": v.num_images / seconds, "micro_batch": v.num_images, "validation_images": v.num_images}
        out["deepspeed"] = run.zero
        if cuda:
            out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GIB
            out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GIB
        return out
    finally:
        run.close()


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


def table(rows: list[dict], dry: bool) -> str:
    """The rows side by side, then the ranges of predicted/measured and reserved/allocated, then
    the recipe's step against upstream's, tier by tier."""
    cols = ("batch", "samples/s", "alloc GiB", "reserved", "predicted", "pred/meas")
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
        cells = [r.get("micro_batch", 1), r["samples_per_s"], r.get("peak_allocated_gb"), r.get("peak_reserved_gb")]
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


CONFIG_KEYS = ("kind", "arch", "resolution", "tier", "mode", "recipe", "vae_slicing", "gradient_checkpointing", "adam")
CONFIG_KEYS += ("per_step_encoding", "label", "family", "controlnet_layers")


def compare(files: list[Path]) -> None:
    """Rows measured on a GPU against the planner's predictions for them, computed now."""
    from controlnet_recipe.core.config import load_config

    cfg = load_config(ROOT / "params.yaml")
    rows = []
    for f in files:
        for r in json.loads(f.read_text())["rows"]:
            if "peak_allocated_gb" not in r:
                continue
            c = {k: r[k] for k in CONFIG_KEYS if k in r}
            if c["kind"] == "validation":
                c.setdefault("vae_slicing", False)
            p = predict(c, cfg, True)
            rows.append({**r, **p, "predicted_over_measured": p["predicted_allocated_gib"] / r["peak_allocated_gb"]})
            rows[-1]["reserved_over_allocated"] = r["peak_reserved_gb"] / r["peak_allocated_gb"]
    print(table(rows, dry=False))


def main() -> None:
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
        help="measured gpu_check JSON files: their rows against today's predictions",
    )
    ap.add_argument("--time-budget", type=float, default=400.0, help="seconds; configurations past it are skipped")
    args = ap.parse_args()
    t_start = time.perf_counter()

    import torch

    from controlnet_recipe.core.config import load_config

    if args.compare:
        compare(args.compare)
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
    predictions = {}
    for c in todo:
        k = key(c)
        predictions[k] = known.get(k) or predict(c, cfg, cuda or args.predict_only)
    if args.predict_only:  # with --only, the other device configurations' predictions stay
        device_keys = [key(c) for c in configs(dry=False)]
        predictions = {k: predictions.get(k) or known[k] for k in device_keys if k in predictions or k in known}
        PLAN_FILE.write_text(json.dumps(predictions, indent=1))
        print(f"gpu_check: {len(predictions)} predictions written to {PLAN_FILE}")
        return
    print(f"gpu_check: predictions ready after {time.perf_counter() - t_start:.0f} s", flush=True)

    device = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    total = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None
    steps, warmup = (4, 2) if cuda else (1, 1)
    rows = []
    held = None  # a transformer step row's training state, for the validation row after it
    for i, c in enumerate(todo):
        pred = predictions[key(c)]
        validates_held = held is not None and c["kind"] == "transformer" and c["mode"] == "validation"
        validates_held = validates_held and (held.c["tier"], held.c["arch"]) == (c["tier"], c["arch"])
        if held is not None and not validates_held:
            held.close()
            held = None
        skip = None
        if total is not None and pred["predicted_peak_gib"] > total:
            skip = f"predicted {pred['predicted_peak_gib']:.1f} GiB > {total:.0f} GiB"
        elif time.perf_counter() - t_start > args.time_budget:
            skip = "time budget"
        elif c["kind"] == "transformer":
            skip = deepspeed_missing(c, cfg)
        if skip:
            rows.append({**c, **pred, "skipped": skip})
            continue
        if not validates_held:
            fresh_state()
        following = todo[i + 1] if i + 1 < len(todo) else {}
        keep = c["kind"] == "transformer" and c["mode"] == "recipe" and following.get("mode") == "validation"
        keep = keep and all(following.get(k) == c[k] for k in ("kind", "tier", "arch"))
        t0 = time.perf_counter()
        try:
            if c["kind"] == "flux":
                got = run_flux(c, cfg, cuda, steps, warmup)
            elif c["kind"] == "validation":
                got = run_recipe_validation(c, cfg, cuda)
            elif c["kind"] == "transformer" and c["mode"] == "validation":
                run, held = held, None
                got = run_transformer_validation(c, cfg, cuda, run)
            elif c["kind"] == "transformer":
                got, held = run_transformer(c, cfg, cuda, steps, warmup, keep=keep)
            else:
                got = run_unet(c, steps, warmup)
        except Exception as e:  # one configuration's failure (an OOM) must not lose the others
            import traceback

            traceback.print_exc(limit=-6)
            got = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
        row = {**c, **pred, **{k: v for k, v in got.items() if k not in c}, "seconds": time.perf_counter() - t0}
        if "peak_allocated_gb" in row:
            row["predicted_over_measured"] = row["predicted_allocated_gib"] / row["peak_allocated_gb"]
            row["reserved_over_allocated"] = row["peak_reserved_gb"] / row["peak_allocated_gb"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if held is not None:
        held.close()

    print()
    print(f"device: {device}" + (f", {total:.0f} GiB" if total else ""))
    print(table(rows, args.dry_run))
    out_dir = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_dry_run.json" if args.dry_run else "gpu_check.json"
    (out_dir / name).write_text(json.dumps({"device": device, "total_gib": total, "rows": rows}, indent=1))
    print(f"gpu_check: {len(rows)} configurations in {time.perf_counter() - t_start:.0f} s; {out_dir / name}")


if __name__ == "__main__":
    main()
