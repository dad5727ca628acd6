"""gpu_check.py's transformer rows: the FLUX- and SD3-family tiers through the recipe's own training
step (training/step.py's controlnet_loss on the family's ControlNet, with training/memory.py's
settings and optimizer, through accelerate as training/trainer.py does, DeepSpeed's plugin where
the tier names it), and training/validation.py's run_validation on a step row's training state.
The dry run's stand-ins: tiny FLUX- and SD3-shaped config folders."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from pathlib import Path

from full_size import GIB, compute_dtype, cuda_peak_memory, timed_validation


def _tiny_vae(scaling_factor: float, shift_factor: float) -> dict:
    """The tiny folders' 16-channel VAE (Flux's and SD3's layout), with the family's latent scaling."""
    return {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [8, 8, 8, 8],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 16,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


# the tiny folders' T5 text encoder (Flux's text_encoder_2, SD3's text_encoder_3)
TINY_T5 = {
    "model_type": "t5",
    "vocab_size": 1000,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 1,
    "num_heads": 2,
    "feed_forward_proj": "gated-gelu",
    "is_gated_act": True,
}

ROOT = Path(__file__).resolve().parents[1]


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
        "vae": _tiny_vae(scaling_factor=0.3611, shift_factor=0.1159),
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
        "text_encoder_2": TINY_T5,
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
        "vae": _tiny_vae(scaling_factor=1.5305, shift_factor=0.0609),
        "text_encoder": clip,
        "text_encoder_2": clip,
        "text_encoder_3": TINY_T5,
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
            # the kind of control and the base's quantisation where the row names them (ADAPTER_ROWS)
            "adapter": recipe.adapter.model_copy(update={"kind": c.get("adapter", recipe.adapter.kind)}),
            "base": recipe.base.model_copy(update={"quantize": c.get("quantize", recipe.base.quantize)}),
        }
    )


class TransformerRun:
    """One transformer tier's training as training/trainer.py sets it up, on random weights: the
    frozen transformer in the tier's dtype (built on the GPU: 12B random weights on the CPU take
    minutes), the family's ControlNet made from it where the trainer makes it (the CPU), the
    tier's model settings, optimizer and learning-rate schedule, all through accelerate (with
    DeepSpeed's plugin where the tier names it), and a cached batch of the family's columns."""

    def __init__(self, c: dict, cfg, cuda: bool):
        from controlnet_recipe.adapters import adapter
        from controlnet_recipe.models.architectures import folder_of
        from controlnet_recipe.models.families import FAMILIES

        self.c, self.cuda, self.recipe = c, cuda, transformer_recipe(c)
        self.kind = adapter(self.recipe.adapter.kind)
        self.t = self.recipe.train
        self.tier = cfg.tiers[c["tier"]]
        self.family = FAMILIES[c["family"]]
        self.folder = folder_of(c["arch"])
        self.zero = self.tier.deepspeed is not None
        self.environ, self.acc = dict(os.environ), None
        try:
            self._setup(c, cuda)
        except BaseException:
            self.close()
            raise
        self.steps_done = 0

    def _setup(self, c: dict, cuda: bool) -> None:
        """The accelerator, the models and their training state, the cached batch, the loss's inputs."""
        import diffusers
        import torch
        from accelerate import Accelerator, PartialState

        from controlnet_recipe.training.memory import deepspeed_plugin

        t, tier = self.t, self.tier
        if self.zero:
            _launch_one_process()
            if not cuda:  # as the trainer: without a GPU, gloo joins DeepSpeed's ranks
                PartialState(backend="gloo")
        # cuDNN's fused attention backward failed on an H200 (run_flux); "cuDNN attention" rows leave it on
        self.cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp("cuDNN" in c["mode"])
        self.micro = tier.batch_size
        self.acc = Accelerator(
            mixed_precision=tier.mixed_precision,
            gradient_accumulation_steps=1,
            deepspeed_plugin=deepspeed_plugin(tier, 1, self.micro, t.max_grad_norm),
            cpu=not cuda and not self.zero,
        )
        self.device = self.acc.device
        self.dtype = compute_dtype(tier.mixed_precision)
        torch.manual_seed(t.seed)
        self.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
            diffusers.FlowMatchEulerDiscreteScheduler.load_config(self.folder / "scheduler")
        )
        self.max_sequence_length = self.family.sequence_length(self.recipe.base.max_sequence_length)
        controlnet = self._build_models(c["family"], cuda)
        self._prepare_training(controlnet, cuda)
        self._cache_batch(c)

    def _build_models(self, family: str, cuda: bool):
        """The frozen transformer in the compute dtype on the device (``self.denoiser``) and the
        family's ControlNet made from it (fp32, as from the trainer's fp32 base), left on the CPU."""
        import contextlib

        import diffusers
        import torch

        from controlnet_recipe.models.families.family import BaseComponents
        from controlnet_recipe.training.memory import master_weights
        from controlnet_recipe.training.quantize import quantize_frozen

        folder, dtype = self.folder, self.dtype
        cls = getattr(diffusers, json.loads((folder / "transformer" / "config.json").read_text())["_class_name"])
        with torch.device(self.device) if cuda else contextlib.nullcontext():
            denoiser = _built_in(dtype, lambda: cls.from_config(cls.load_config(folder / "transformer")))
            denoiser.requires_grad_(False).eval()
            shell = BaseComponents(family, None, None, None, denoiser, self.scheduler)
            controlnet = self.kind.make(self.family, shell, self.t, self.recipe.adapter)
        if not {id(p) for p in controlnet.parameters()} & {id(p) for p in denoiser.parameters()}:
            controlnet.to("cpu")  # where the trainer makes it: prepare moves it (a Control-LoRA lives in the base)
        quantize_frozen(denoiser, self.recipe.base.quantize, dtype, self.device)
        self.denoiser = denoiser.to(self.device, dtype) if self.recipe.base.quantize == "none" else denoiser.to(self.device)
        master_weights(controlnet, dtype)
        return controlnet

    def _prepare_training(self, controlnet, cuda: bool) -> None:
        """The tier's model settings, optimizer and learning-rate schedule, prepared by accelerate;
        the setup's peak (the frozen transformer comes to the GPU in the compute dtype before
        layerwise casting stores it in fp8, training/trainer.py's order)."""
        import torch
        from diffusers.optimization import get_scheduler

        from controlnet_recipe.training.memory import apply_model_settings, direct_attention_calls, make_optimizer, param_groups
        from controlnet_recipe.training.quantize import tier_with

        t, tier, denoiser = self.t, self.tier, self.denoiser
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tier = tier_with(tier, self.recipe.base.quantize)  # the trainer's rule: the base's scheme, not the tier's fp8 on top
        apply_model_settings(denoiser, controlnet, tier, self.dtype)
        direct_attention_calls(denoiser, controlnet)
        controlnet.train()
        lr = t.learning_rate
        groups = param_groups(controlnet, lr, t.new_layers_lr_multiplier, self.kind.new_layers(self.family))
        optimizer = make_optimizer(groups, tier, t, lr)
        lr_scheduler = get_scheduler(
            t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=1000
        )
        self.controlnet, self.optimizer, self.lr_scheduler = self.acc.prepare(controlnet, optimizer, lr_scheduler)
        self.setup_peak_gb = torch.cuda.max_memory_allocated() / GIB if cuda else None

    def _cache_batch(self, c: dict) -> None:
        """A micro-batch of the latent cache's columns (training/batches.py: float32 on the CPU, moved
        by the step) and the loss's inputs."""
        import torch

        from controlnet_recipe.models.families.family import POOLED, TEXT
        from controlnet_recipe.training.step import LossInputs, objective

        micro, res = self.micro, c["resolution"]
        vae = json.loads((self.folder / "vae" / "config.json").read_text())
        down = 2 ** (len(vae["block_out_channels"]) - 1)
        lat, ch = res // down, vae.get("latent_channels", 16)
        tokens = self.max_sequence_length + (77 if c["family"] == "sd3" else 0)  # SD3: CLIP's 77, then T5's
        dim, pooled = self.denoiser.config.joint_attention_dim, self.denoiser.config.pooled_projection_dim
        g = torch.Generator().manual_seed(0)
        self.batch = {
            "latent_mean": torch.randn(micro, ch, lat, lat, generator=g),
            "latent_std": torch.full((micro, ch, lat, lat), 0.01),
            "control_mean": torch.randn(micro, ch, lat, lat, generator=g),
            "control_std": torch.full((micro, ch, lat, lat), 0.01),
            TEXT: torch.randn(micro, tokens, dim, generator=g),
            POOLED: torch.randn(micro, pooled, generator=g),
            "conditioning": torch.rand(micro, 3, res, res, generator=g),
        }
        self.inputs = LossInputs(
            controlnet=self.controlnet,
            denoiser=self.denoiser,
            scheduler=self.scheduler,
            empty_prompt={TEXT: torch.zeros(1, tokens, dim), POOLED: torch.zeros(1, pooled)},
            scaling_factor=vae.get("scaling_factor", 1.0),
            shift_factor=vae.get("shift_factor") or 0.0,
            p_empty=self.t.proportion_empty_prompts,
            device=self.device,
            dtype=self.dtype,
            objective=objective(self.t),
            family=self.family,
            adapter=self.kind,
            channels_last=self.tier.channels_last,
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


def _launch_one_process() -> None:
    """The launcher's variables for one process, as `accelerate launch` would set them on a one-GPU machine."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _built_in(dtype, builder):
    """A model built with ``dtype`` as the default (its random weights made in it, not cast after)."""
    from controlnet_recipe.models.families.measured import build

    return build(builder, dtype)


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


def run_transformer(c: dict, cfg, cuda: bool, steps: int, warmup: int, keep: bool = False) -> tuple[dict, TransformerRun | None]:
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
            out.update(cuda_peak_memory())
    except BaseException:
        run.close()
        raise
    if not keep:
        run.close()
        run = None
    return out, run


# a family's text encoders: their names (the folder's subfolders of their configs) and transformers' classes
TEXT_ENCODERS = {
    "flux": {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"},
    "sd3": {
        "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "text_encoder_3": "T5EncoderModel",
    },
}


def run_transformer_validation(c: dict, cfg, cuda: bool, run: TransformerRun | None = None) -> dict:
    """training/validation.py's run_validation on a transformer tier's training state (``run``, the
    step row's; else one made here, after one training step): the recipe's images per prompt, 2
    denoising steps. The text encoders, full size, stay on the CPU where the trainer keeps them
    (FlowFamily.validation_inputs encodes the prompt there); the VAE comes to the GPU. Peak
    allocated and reserved during validation; samples/s over its wall time (CPU encoding included)."""
    import torch
    from PIL import Image

    from controlnet_recipe.training.validation import ValidationPairs

    if run is None:
        _, run = run_transformer(c, cfg, cuda, steps=1, warmup=0, keep=True)
    try:
        res = c["resolution"]
        base = _validation_base(run, c["family"], cuda)
        v = run.t.validation.model_copy(update={"num_inference_steps": 2})
        pairs = ValidationPairs([Image.new("RGB", (res, res))], ["a photo of a face"])
        controlnet = run.acc.unwrap_model(run.controlnet)
        if not cuda:  # run_validation computes in fp32 on a CPU (it casts the denoiser): the dry run's parts too
            controlnet.float()  # DeepSpeed holds it in bf16
            _layerwise_compute_dtype(run.denoiser, torch.float32)  # frozen_fp8's layers compute in bf16
        return {**timed_validation(base, controlnet, pairs, v, res, cuda, empty_cache=True), "deepspeed": run.zero}
    finally:
        run.close()


def _validation_base(run: TransformerRun, family: str, cuda: bool):
    """The base's components for validation: ``run``'s transformer and scheduler, the family's text
    encoders and VAE at full size, built on the GPU in the compute dtype (random init of T5-XXL's
    4.7B weights on the CPU is slow), then kept on the CPU in fp32 as the trainer loads them."""
    import contextlib

    import diffusers
    import torch
    import transformers

    from controlnet_recipe.models import tiny
    from controlnet_recipe.models.families.family import BaseComponents

    folder, parts = run.folder, {}
    with torch.device(run.device) if cuda else contextlib.nullcontext():
        for name, cls_name in TEXT_ENCODERS[family].items():
            cls = getattr(transformers, cls_name)
            config = cls.config_class.from_pretrained(folder / name)
            parts[name] = _built_in(run.dtype, lambda cls=cls, config=config: cls(config)).requires_grad_(False).eval()
        vae_cls = diffusers.AutoencoderKL
        parts["vae"] = _built_in(run.dtype, lambda: vae_cls.from_config(vae_cls.load_config(folder / "vae")))
    for m in parts.values():
        m.requires_grad_(False).eval().to("cpu", torch.float32)
    tok = tiny.build_tokenizer(["a", "photo", "of", "face"], Path(tempfile.mkdtemp()))
    tok.model_max_length = 77  # CLIP's; T5 reads base.max_sequence_length
    return BaseComponents(
        family=family,
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
