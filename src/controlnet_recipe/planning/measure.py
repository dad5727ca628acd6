"""One training step and one validation pass of the real architecture, run on fake tensors under
:class:`~.tracker.LiveMemory`: what they allocate, by group, at their peaks.

The step is the train stage's (latent cache: neither VAE nor text encoder on the GPU) or
upstream's (``per_step_encoding``: the VAE, and for SD 1.x/2.x the text encoder, on the GPU and
run on every step). The frozen base is held in the mixed-precision dtype, the ControlNet in fp32
under autocast, as both scripts do. Two optimizer steps run, so the second one's forward sees what
stays between steps: the optimizer state, and the gradients unless they are set to None.
bitsandbytes' 8-bit state and DeepSpeed's buffers cannot run on fake tensors: ``terms`` adds them.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .tracker import LiveMemory

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class StepSpec:
    """Everything a training step's memory depends on."""

    arch: str  # a folder of configs/architectures, a diffusers model folder, or "tiny" (the demo's base)
    resolution: int
    micro_batch: int
    accumulation: int = 1
    mixed_precision: str = "fp16"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    set_grads_to_none: bool = True
    attention: str = "sdpa"  # sdpa, xformers (both: fused kernels, nothing quadratic kept) | math (scores materialised)
    adam: str = "fused"  # fused (the recipe) | foreach (upstream's torch.optim.AdamW on CUDA) | none (8-bit, DeepSpeed)
    deepspeed: bool = False  # the ControlNet held in the half dtype by DeepSpeed, its optimizer on the CPU
    per_step_encoding: bool = False  # upstream: VAE (+ text encoder) on the GPU, run every step
    validation_images: int = 1
    validation_resolution: int | None = None  # None: the training resolution
    # the recipe empties PyTorch's cache before validating; upstream does not, so the blocks that
    # held the step's activations stay reserved (fragmented) under what validation loads
    empty_cache_before_validation: bool = True
    vae_slicing: bool = True  # the recipe decodes validation images one at a time on a GPU; upstream one per call
    # SDXL pipelines decode in fp32 when the VAE's config says force_upcast (SDXL's own VAE); None:
    # as the architecture's config says; False: a replacement VAE that is fp16-safe (the fp16-fixed one)
    vae_force_upcast: bool | None = None
    flux_layers: tuple[int, int] = (4, 0)  # Flux ControlNet: double-stream, single-stream blocks


@dataclass
class Measured:
    """Peak allocated bytes of the step and of validation, each with its groups at that moment."""

    step_peak: int
    step_groups: dict[str, int]
    validation_peak: int
    validation_groups: dict[str, int]
    validation_start: int  # what stays allocated between the last step and validation
    validation_weights: int  # what validation loads onto the GPU (VAE, text encoders)
    attention_workspace: int
    weights: dict[str, int]  # "<model> <dtype>" -> bytes
    trainable_params: int
    param_shapes: list[tuple[int, ...]]  # the ControlNet's trainable tensors (bitsandbytes' state)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _build(builder, dtype: torch.dtype):
    """Build a module with ``dtype`` as the default (casting afterwards cannot swap fake parameters)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return builder()
    finally:
        torch.set_default_dtype(old)


class _Models:
    """The modules of one architecture on fake tensors, and how to run them."""

    device_type = "cpu"  # autocast's: the GPU check runs these models for real on "cuda"
    upcast_vae = None  # the VAE the pipeline decodes with, when it upcasts

    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec
        self.dtype = DTYPES[spec.mixed_precision]
        self.frozen: dict[str, torch.nn.Module] = {}  # on the GPU while training
        self.for_validation: dict[str, torch.nn.Module] = {}  # loaded onto the GPU to validate

    def set_switches(self) -> None:
        """Gradient checkpointing on the ControlNet and the base."""
        for model in (self.controlnet, self.base):
            if self.spec.gradient_checkpointing:
                model.enable_gradient_checkpointing()
            else:
                model.disable_gradient_checkpointing()

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


class _UNetModels(_Models):
    """SD 1.x/2.x and SDXL (and the demo's tiny base): UNet + ControlNetModel.from_unet."""

    def __init__(self, spec: StepSpec) -> None:
        super().__init__(spec)
        from diffusers import ControlNetModel

        from ..models import architectures, tiny

        res = spec.resolution
        if spec.arch == "tiny":
            parts = {
                "unet": lambda: tiny.build_unet(res),
                "vae": lambda: tiny.build_vae(res),
                "text_encoder": lambda: tiny.build_text_encoder(1000),
            }
            self.tokens, self.text_dim = tiny.MAX_TOKENS, tiny.TEXT_DIM
        else:
            names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if architectures.family_of(spec.arch) == "sdxl" else [])
            parts = {n: (lambda n=n: architectures.build(spec.arch, (n,))[n]) for n in names}
            self.tokens = 77
        unet = _build(parts["unet"], self.dtype)
        unet.requires_grad_(False).eval()
        if spec.arch != "tiny":
            self.text_dim = unet.config.cross_attention_dim
        vae_cfg = _build(parts["vae"], torch.float32).config if spec.arch == "tiny" else architectures.vae_config(spec.arch)
        self.down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.latent_channels = vae_cfg["latent_channels"]
        from ..training.step import DEFAULT_HINT_CHANNELS

        cn_dtype = self.dtype if spec.deepspeed else torch.float32
        self.controlnet = _build(
            lambda: ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=DEFAULT_HINT_CHANNELS[: len(vae_cfg["block_out_channels"])]
            ),
            cn_dtype,
        )
        self.unet = self.base = unet
        self.frozen["unet"] = unet
        self.sdxl = unet.config.get("addition_embed_type") == "text_time"
        # upstream's SDXL script keeps its VAE in fp32 unless given another (the fp16-fixed) one
        vae_dtype = torch.float32 if self.sdxl and spec.per_step_encoding else self.dtype
        encoders = [n for n in parts if n.startswith("text_encoder")]
        vae = _build(parts["vae"], vae_dtype)
        text = {n: _build(parts[n], self.dtype) for n in encoders}
        for m in (vae, *text.values()):
            m.requires_grad_(False).eval()
        self.vae = vae
        self.text_encoder = text.get("text_encoder")
        # the SDXL pipeline's decoding upcasts a force_upcast VAE to fp32 (its weights too)
        upcast = spec.vae_force_upcast if spec.vae_force_upcast is not None else bool(vae.config.get("force_upcast"))
        self.upcast_vae = None
        if self.sdxl and upcast and vae_dtype != torch.float32:
            self.upcast_vae = _build(parts["vae"], torch.float32).requires_grad_(False).eval()
            self.for_validation["vae upcast to fp32"] = self.upcast_vae
        if spec.per_step_encoding:  # upstream: VAE and text encoders on the GPU throughout
            # (SDXL's script runs its encoders once, over the dataset, and leaves them there)
            self.frozen.update({"vae": vae, **text})
        else:
            self.for_validation.update({"vae": vae, **text})

    def set_switches(self) -> None:
        """Checkpointing, and the attention: ``math`` as diffusers computed it before PyTorch 2's
        SDPA (scores materialised), else SDPA."""
        super().set_switches()
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        proc = AttnProcessor if self.spec.attention == "math" else AttnProcessor2_0
        for model in (self.controlnet, self.base):
            model.set_attn_processor(proc())

    def _text(self, b: int) -> tuple[torch.Tensor, dict | None]:
        added = None
        if self.sdxl:
            pooled = self.unet.config.projection_class_embeddings_input_dim - 6 * self.unet.config.addition_time_embed_dim
            added = {"text_embeds": torch.randn(b, pooled), "time_ids": torch.randn(b, 6)}
        return torch.randn(b, self.tokens, self.text_dim), added

    def training_loss(self) -> torch.Tensor:
        b, res, lat = self.spec.micro_batch, self.spec.resolution, self.spec.resolution // self.down
        hint = torch.rand(b, 3, res, res)
        if self.spec.per_step_encoding:
            pixels = torch.randn(b, 3, res, res).to(next(self.vae.parameters()).dtype)
            x0 = self.vae.encode(pixels).latent_dist.sample().float()
            if not self.sdxl:  # SDXL: the embeddings were computed once, before training
                enc = self.text_encoder(torch.randint(0, 1000, (b, self.tokens)))[0].float()
                _, added = self._text(b)
            else:
                enc, added = self._text(b)
        else:
            x0 = torch.randn(b, self.latent_channels, lat, lat)
            enc, added = self._text(b)
        noise = torch.randn_like(x0)
        noisy = x0 + noise
        ts = torch.randint(0, 1000, (b,))
        with self.autocast():
            down, mid = self.controlnet(
                noisy, ts, encoder_hidden_states=enc, controlnet_cond=hint, added_cond_kwargs=added, return_dict=False
            )
            pred = self.unet(
                noisy.to(self.dtype),
                ts,
                encoder_hidden_states=enc.to(self.dtype),
                added_cond_kwargs=None if added is None else {k: v.to(self.dtype) for k, v in added.items()},
                down_block_additional_residuals=[d.to(self.dtype) for d in down],
                mid_block_additional_residual=mid.to(self.dtype),
            ).sample
        return torch.nn.functional.mse_loss(pred.float(), noise)

    @torch.no_grad()
    def validate(self) -> None:
        """One denoising step of the pipeline (classifier-free guidance doubles the batch), then
        the VAE decoding the images."""
        n, res = self.spec.validation_images, self.spec.validation_resolution or self.spec.resolution
        lat = res // self.down
        for name, enc in self.for_validation.items():
            if name.startswith("text_encoder"):
                enc(torch.randint(0, 1000, (2 * n, self.tokens)))
        enc, added = self._text(2 * n)
        x = torch.randn(2 * n, self.latent_channels, lat, lat).to(self.dtype)
        with self.autocast():
            down, mid = self.controlnet(
                x,
                torch.tensor(500),
                encoder_hidden_states=enc.to(self.dtype),
                controlnet_cond=torch.rand(2 * n, 3, res, res).to(self.dtype),
                added_cond_kwargs=added,
                return_dict=False,
            )
            self.unet(
                x,
                torch.tensor(500),
                encoder_hidden_states=enc.to(self.dtype),
                added_cond_kwargs=added,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            )
        del down, mid
        vae = self.upcast_vae or self.vae
        vae_dtype = next(vae.parameters()).dtype
        with self.autocast():  # the recipe's validation runs the whole pipeline under autocast
            for _ in range(n if self.spec.vae_slicing else 1):  # slicing: one image at a time
                vae.decode(torch.randn(1 if self.spec.vae_slicing else n, self.latent_channels, lat, lat).to(vae_dtype))


class _FluxModels(_Models):
    """FLUX.1: FluxTransformer2DModel + FluxControlNetModel.from_transformer, latents packed in
    2x2 patches (upstream's train_controlnet_flux.py; T5 features precomputed, text encoders off
    the GPU while training)."""

    TEXT_TOKENS = 512  # T5's max_sequence_length in upstream's script

    def __init__(self, spec: StepSpec, validation_models: bool = True) -> None:
        super().__init__(spec)
        from diffusers import AutoencoderKL, FluxControlNetModel, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from ..models.architectures import folder_of

        folder = folder_of(spec.arch)
        cfg = FluxTransformer2DModel.load_config(folder / "transformer")
        self.transformer = _build(lambda: FluxTransformer2DModel.from_config(cfg), self.dtype)
        self.transformer.requires_grad_(False).eval()
        double, single = spec.flux_layers
        cn_dtype = self.dtype if spec.deepspeed else torch.float32
        self.controlnet = _build(
            lambda: FluxControlNetModel.from_transformer(
                self.transformer,
                num_layers=double,
                num_single_layers=single,
                attention_head_dim=cfg["attention_head_dim"],
                num_attention_heads=cfg["num_attention_heads"],
            ),
            cn_dtype,
        )
        self.base = self.transformer
        self.vae = _build(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")), self.dtype)
        self.vae.requires_grad_(False).eval()
        self.frozen["transformer"] = self.transformer
        if spec.per_step_encoding:
            self.frozen["vae"] = self.vae
        else:
            self.for_validation["vae"] = self.vae
        self.latent_channels = self.vae.config.latent_channels
        self.joint_dim = cfg["joint_attention_dim"]
        self.pooled_dim = cfg["pooled_projection_dim"]
        if not validation_models:  # the GPU check's training step: T5 would only take memory
            return
        clip = _build(lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")), self.dtype)
        t5 = _build(lambda: T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_2")), self.dtype)
        for m in (clip, t5):
            m.requires_grad_(False).eval()
        self.for_validation.update({"text_encoder": clip, "text_encoder_2": t5})

    def _inputs(self, b: int, side: int | None = None) -> dict:
        side = side or self.spec.resolution // 16  # 8x VAE, then 2x2 patches
        return dict(
            encoder_hidden_states=torch.randn(b, self.TEXT_TOKENS, self.joint_dim).to(self.dtype),
            pooled_projections=torch.randn(b, self.pooled_dim).to(self.dtype),
            timestep=torch.rand(b).to(self.dtype),
            guidance=torch.full((b,), 3.5).to(self.dtype),
            img_ids=torch.zeros(side * side, 3).to(self.dtype),
            txt_ids=torch.zeros(self.TEXT_TOKENS, 3).to(self.dtype),
        )

    def _packed(self, b: int) -> torch.Tensor:
        side = self.spec.resolution // 16
        if self.spec.per_step_encoding:
            x = self.vae.encode(torch.randn(b, 3, self.spec.resolution, self.spec.resolution).to(self.dtype)).latent_dist.sample()
            return x.reshape(b, self.latent_channels, side, 2, side, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, side * side, -1)
        return torch.randn(b, side * side, 4 * self.latent_channels).to(self.dtype)

    def training_loss(self) -> torch.Tensor:
        b = self.spec.micro_batch
        x0, cond = self._packed(b), self._packed(b)
        noise = torch.randn_like(x0)
        noisy = 0.5 * x0 + 0.5 * noise
        kw = self._inputs(b)
        with self.autocast():
            blocks, singles = self.controlnet(hidden_states=noisy, controlnet_cond=cond, return_dict=False, **kw)
            pred = self.transformer(
                hidden_states=noisy,
                controlnet_block_samples=[s.to(self.dtype) for s in blocks] if blocks is not None else None,
                controlnet_single_block_samples=[s.to(self.dtype) for s in singles] if singles is not None else None,
                return_dict=False,
                **kw,
            )[0]
        return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())

    @torch.no_grad()
    def validate(self) -> None:
        """The prompt through CLIP and T5, one denoising step (guidance is an input: no doubled
        batch), then the VAE decoding."""
        n, side = self.spec.validation_images, (self.spec.validation_resolution or self.spec.resolution) // 16
        self.for_validation["text_encoder"](torch.randint(0, 1000, (n, 77)))
        self.for_validation["text_encoder_2"](torch.randint(0, 1000, (n, self.TEXT_TOKENS)))
        x = torch.randn(n, side * side, 4 * self.latent_channels).to(self.dtype)
        kw = self._inputs(n, side)
        with self.autocast():
            blocks, singles = self.controlnet(hidden_states=x, controlnet_cond=x, return_dict=False, **kw)
            self.transformer(
                hidden_states=x, controlnet_block_samples=blocks, controlnet_single_block_samples=singles, return_dict=False, **kw
            )
        del blocks, singles
        self.vae.decode(torch.randn(n, self.latent_channels, 2 * side, 2 * side).to(self.dtype))


def _norm_in_fp32(self, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm/LayerNorm as CUDA's autocast runs them: half inputs cast up, the output fp32 (CPU
    autocast, which the fake run has, leaves them in half)."""
    if torch.is_autocast_enabled("cpu") and x.dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            w = None if self.weight is None else self.weight.float()
            b = None if self.bias is None else self.bias.float()
            if isinstance(self, torch.nn.GroupNorm):
                return torch.nn.functional.group_norm(x.float(), self.num_groups, w, b, self.eps)
            return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)
    return type(self).forward(self, x)


def cuda_autocast_norms(*models: torch.nn.Module) -> None:
    """Give the models' norms CUDA's autocast behaviour (per instance, so checkpointing's
    recomputation runs the same code)."""
    import types

    for model in models:
        for mod in model.modules():
            if type(mod) in (torch.nn.GroupNorm, torch.nn.LayerNorm):
                mod.forward = types.MethodType(_norm_in_fp32, mod)


_FAKE = FakeTensorMode(allow_non_fake_inputs=True)  # one for the process: its models serve every spec
_BUILT: dict[tuple, _Models] = {}


def _models(spec: StepSpec) -> _Models:
    """The models for ``spec``, built once per architecture, dtype and placement; the switches
    (checkpointing, attention, batch) are set on them for each spec."""
    from ..models import architectures

    key = (spec.arch, spec.mixed_precision, spec.deepspeed, spec.per_step_encoding, spec.flux_layers, spec.vae_force_upcast)
    m = _BUILT.get(key)
    if m is None:
        flux = spec.arch != "tiny" and (architectures.folder_of(spec.arch) / "transformer").is_dir()
        m = _BUILT[key] = (_FluxModels if flux else _UNetModels)(spec)
        cuda_autocast_norms(m.controlnet, *m.frozen.values(), *m.for_validation.values())
    m.spec = spec
    m.set_switches()
    for p in m.controlnet.parameters():
        p.grad = None
    m.controlnet.train()
    return m


def _register_weights(mem: LiveMemory, models: dict[str, torch.nn.Module]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for name, module in models.items():
        for t in (*module.parameters(), *module.buffers()):
            key = f"{name} {_dtype_name(t.dtype)}" if t.is_floating_point() else f"{name} other"
            before = mem.groups[f"weights: {key}"]
            mem.register(t, f"weights: {key}")
            weights[key] = weights.get(key, 0) + mem.groups[f"weights: {key}"] - before
    return weights


def _train_steps(m: _Models, mem: LiveMemory, spec: StepSpec):
    """Two optimizer steps; returns the optimizer (its state stays allocated through validation)."""
    params = [p for p in m.controlnet.parameters() if p.requires_grad]
    opt = None
    if spec.adam != "none":
        kw = {"fused": True} if spec.adam == "fused" else {"foreach": True}
        opt = torch.optim.AdamW(params, lr=1e-5, **kw)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: mem.regroup(p.grad, "gradients")) for p in params]
    keep_grads = not spec.set_grads_to_none or spec.accumulation > 1  # accumulation keeps them between micro-steps
    for _ in range(2):
        loss = m.training_loss()
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if opt is not None:
            opt.step()
            for state in opt.state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor) and t.numel() > 1:
                        mem.regroup(t, "optimizer")
        if not keep_grads:
            for p in params:
                p.grad = None
    for h in hooks:
        h.remove()
    return opt


@lru_cache(maxsize=64)
def measure(spec: StepSpec) -> Measured:
    """Run ``spec``'s training step twice and one validation pass on fake tensors; the peaks."""
    with _FAKE:
        m = _models(spec)
        mem = LiveMemory()
        with mem:
            weights = _register_weights(mem, {"controlnet": m.controlnet, **m.frozen})
            opt = _train_steps(m, mem, spec)
            step_peak, step_groups = mem.peak, dict(mem.peak_groups)
            if spec.set_grads_to_none:
                for p in m.controlnet.parameters():
                    p.grad = None
            mem.reset_peak()
            validation_start = mem.current
            loaded = _register_weights(mem, m.for_validation)
            weights.update(loaded)
            m.controlnet.eval()
            m.validate()
            validation_peak, validation_groups = mem.peak, dict(mem.peak_groups)
            del opt
        trainable = [p for p in m.controlnet.parameters() if p.requires_grad]
        return Measured(
            step_peak=step_peak,
            step_groups={k: v for k, v in step_groups.items() if v},
            validation_peak=validation_peak,
            validation_groups={k: v for k, v in validation_groups.items() if v},
            validation_start=validation_start,
            validation_weights=sum(loaded.values()),
            attention_workspace=mem.attention_workspace,
            weights=weights,
            trainable_params=sum(p.numel() for p in trainable),
            param_shapes=[tuple(p.shape) for p in trainable],
        )


def spec_dict(spec: StepSpec) -> dict:
    return asdict(spec)
