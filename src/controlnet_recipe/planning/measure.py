"""One training step and one validation pass of the real architecture, run on fake tensors under
:class:`~.tracker.LiveMemory`: what they allocate, by group, at their peaks.

The step is the train stage's (latent cache: neither VAE nor text encoder on the GPU) or
upstream's (``per_step_encoding``: the VAE, and for SD 1.x/2.x the text encoder, on the GPU and
run on every step). The frozen base is held in the mixed-precision dtype, the ControlNet in fp32
under autocast, as both scripts do. Two optimizer steps run, so the second one's forward sees what
stays between steps: the optimizer state, and the gradients unless they are set to None.
bitsandbytes' 8-bit state and DeepSpeed's buffers cannot run on fake tensors: ``terms`` adds them.

``frozen_fp8`` (diffusers' ``enable_layerwise_casting``: the frozen base's weights stored in
float8_e4m3fn, each layer upcast to the compute dtype for its forward) runs here as diffusers runs
it, with the same choice of layers (norms, embeddings and the model's own skip patterns stay in the
compute dtype). Its upcast copies are counted as they live: one layer's at a time without
gradients, but a layer whose input needs a gradient leaves its copy saved for the backward, so
without gradient checkpointing every such layer's copy stays until the backward reaches it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..training.memory import frozen_blocks, local_bytes
from .tracker import LiveMemory

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP8 = torch.float8_e4m3fn
# T5 tokens per caption when the recipe's base.max_sequence_length is null (params.yaml's defaults)
DEFAULT_T5_TOKENS = {"flux": 512, "sd3": 256}
UPCAST_GROUP = "frozen_fp8_upcast"  # the compute-dtype copies layerwise casting makes


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
    deepspeed: bool = False  # the ControlNet held in the half dtype by DeepSpeed, its gradients and optimizer on the CPU
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
    sd3_layers: int = 12  # SD3 ControlNet: joint blocks copied from the transformer
    max_sequence_length: int | None = None  # T5 tokens (sd3, flux); None: DEFAULT_T5_TOKENS
    frozen_fp8: bool = False  # the frozen base's weights in fp8, layerwise upcast (diffusers' layerwise casting)
    # False: validation's prompts encoded before (like training's captions): no text encoder on the GPU
    validation_text_encoders: bool = True


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
    frozen_names: tuple[str, ...] = ()  # the frozen models' names in the weight groups ("weights: <name> <dtype>")
    frozen_block_bytes: int = 0  # the frozen models' largest block (their _no_split_modules): what FSDP gathers at once


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", FP8: "fp8"}[dtype]


_TRACKER: list[LiveMemory] = []  # the LiveMemory of the measurement running (layerwise casting's hooks regroup into it)


def _swap_params(module: torch.nn.Module, dtype: torch.dtype, group: str) -> None:
    """``module.to(dtype)`` as layerwise casting calls it, for fake parameters (which cannot be
    swapped in place): new parameters; what autograd saved of the old ones stays alive, as the
    storage behind a real ``param.data`` does."""
    for name, p in list(module._parameters.items()):
        if p is not None and p.is_floating_point() and p.dtype != dtype:
            new = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
            module._parameters[name] = new
            if _TRACKER:
                _TRACKER[-1].regroup(new, group)


def layerwise_fp8(model: torch.nn.Module, name: str, compute_dtype: torch.dtype) -> int:
    """diffusers' ``model.enable_layerwise_casting(storage_dtype=float8_e4m3fn, compute_dtype)``:
    the same layers (hooks/layerwise_casting.py: supported leaf layers, skipping those whose name
    matches the default patterns, the model's ``_skip_layerwise_casting_patterns`` or
    ``_keep_in_fp32_modules``), cast to fp8 now, upcast before each forward, cast back after.
    Returns how many parameters it stores in fp8."""
    import re

    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN)
    patterns += tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    patterns += tuple(getattr(model, "_skip_layerwise_casting_patterns", None) or ())
    weights = f"weights: {name} fp8"
    count = 0

    def pre(module, args):
        _swap_params(module, compute_dtype, UPCAST_GROUP)

    def post(module, args, output):
        _swap_params(module, FP8, weights)

    def walk(module: torch.nn.Module, prefix: str) -> None:
        nonlocal count
        if any(re.search(p, prefix) for p in patterns):
            return
        if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            _swap_params(module, FP8, weights)
            count += sum(p.numel() for p in module.parameters(recurse=False))
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)
            return
        for child_name, child in module.named_children():
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(model, "")
    return count


def _build(builder, dtype: torch.dtype):
    """Build a module with ``dtype`` as the default (casting afterwards cannot swap fake parameters)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return builder()
    finally:
        torch.set_default_dtype(old)


def _buffers_to(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating buffers that a model builds in fp32 whatever the default dtype (PatchEmbed's
    positional table), as ``model.to(dtype)`` would (fake tensors: new buffers, not in place)."""
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                mod._buffers[name] = buf.to(dtype)


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
        if spec.frozen_fp8:  # after from_unet: the ControlNet copies the base's weights first
            layerwise_fp8(unet, "unet", self.dtype)
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

    @property
    def TEXT_TOKENS(self) -> int:  # T5's max_sequence_length: upstream's script's 512 unless the recipe says
        return self.spec.max_sequence_length or DEFAULT_T5_TOKENS["flux"]

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
        if spec.frozen_fp8:  # after from_transformer: the ControlNet copies the base's weights first
            layerwise_fp8(self.transformer, "transformer", self.dtype)
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
        """The prompt through CLIP and T5 (``validation_text_encoders``; else its embeddings, encoded
        on the CPU, come to the GPU: ``_inputs``' tensors), the control image through the VAE's
        encoder, one denoising step (guidance is an input: no doubled batch), then the VAE
        decoding, one image at a time with ``vae_slicing``; all under autocast, as the recipe's
        validation runs the pipeline."""
        n, res = self.spec.validation_images, self.spec.validation_resolution or self.spec.resolution
        side = res // 16
        if self.spec.validation_text_encoders:
            self.for_validation["text_encoder"](torch.randint(0, 1000, (n, 77)))
            self.for_validation["text_encoder_2"](torch.randint(0, 1000, (n, self.TEXT_TOKENS)))
        with self.autocast():
            cond = _encode_control(self.vae, n, res, self.dtype, self.spec.vae_slicing)
        cond = cond.reshape(n, self.latent_channels, side, 2, side, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, side * side, -1)
        x = torch.randn(n, side * side, 4 * self.latent_channels).to(self.dtype)
        kw = self._inputs(n, side)
        with self.autocast():
            blocks, singles = self.controlnet(hidden_states=x, controlnet_cond=cond, return_dict=False, **kw)
            self.transformer(
                hidden_states=x, controlnet_block_samples=blocks, controlnet_single_block_samples=singles, return_dict=False, **kw
            )
        del blocks, singles, cond
        with self.autocast():
            for _ in range(n if self.spec.vae_slicing else 1):  # slicing: one image at a time
                latents = torch.randn(1 if self.spec.vae_slicing else n, self.latent_channels, 2 * side, 2 * side)
                self.vae.decode(latents.to(self.dtype))


class _SD3Models(_Models):
    """SD3/SD3.5: SD3Transformer2DModel + SD3ControlNetModel.from_transformer (``sd3_layers`` joint
    blocks, no extra conditioning channels: the control image enters as VAE latents). Latents are
    not packed; the timestep is the scheduler's (0-1000). The prompt: CLIP-L and CLIP-G's 77 tokens
    then T5's, all precomputed while training."""

    CLIP_TOKENS = 77

    def __init__(self, spec: StepSpec, validation_models: bool = True) -> None:
        super().__init__(spec)
        from diffusers import AutoencoderKL, SD3ControlNetModel, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        from ..models.architectures import folder_of

        folder = folder_of(spec.arch)
        cfg = SD3Transformer2DModel.load_config(folder / "transformer")
        self.transformer = _build(lambda: SD3Transformer2DModel.from_config(cfg), self.dtype)
        self.transformer.requires_grad_(False).eval()
        _buffers_to(self.transformer, self.dtype)  # from_pretrained(torch_dtype=...) casts pos_embed's too
        cn_dtype = self.dtype if spec.deepspeed else torch.float32
        self.controlnet = _build(
            lambda: SD3ControlNetModel.from_transformer(
                self.transformer, num_layers=spec.sd3_layers, num_extra_conditioning_channels=0
            ),
            cn_dtype,
        )
        self.base = self.transformer
        if spec.frozen_fp8:  # after from_transformer: the ControlNet copies the base's weights first
            layerwise_fp8(self.transformer, "transformer", self.dtype)
        vae_cfg = AutoencoderKL.load_config(folder / "vae")
        self.vae = _build(lambda: AutoencoderKL.from_config(vae_cfg), self.dtype)
        self.vae.requires_grad_(False).eval()
        self.down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.frozen["transformer"] = self.transformer
        if spec.per_step_encoding:
            self.frozen["vae"] = self.vae
        else:
            self.for_validation["vae"] = self.vae
        self.latent_channels = vae_cfg["latent_channels"]
        self.joint_dim = cfg["joint_attention_dim"]
        self.pooled_dim = cfg["pooled_projection_dim"]
        if not validation_models:
            return
        encoders = {
            "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
            "text_encoder_3": lambda: T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_3")),
        }
        for name, build in encoders.items():
            if (folder / name / "config.json").is_file():
                self.for_validation[name] = _build(build, self.dtype).requires_grad_(False).eval()

    @property
    def text_tokens(self) -> int:
        return self.CLIP_TOKENS + (self.spec.max_sequence_length or DEFAULT_T5_TOKENS["sd3"])

    def _inputs(self, b: int) -> dict:
        return dict(
            encoder_hidden_states=torch.randn(b, self.text_tokens, self.joint_dim).to(self.dtype),
            pooled_projections=torch.randn(b, self.pooled_dim).to(self.dtype),
            timestep=(torch.rand(b) * 1000).to(self.dtype),
        )

    def _latents(self, b: int, res: int) -> torch.Tensor:
        lat = res // self.down
        if self.spec.per_step_encoding:
            return self.vae.encode(torch.randn(b, 3, res, res).to(self.dtype)).latent_dist.sample()
        return torch.randn(b, self.latent_channels, lat, lat).to(self.dtype)

    def training_loss(self) -> torch.Tensor:
        b, res = self.spec.micro_batch, self.spec.resolution
        x0, cond = self._latents(b, res), self._latents(b, res)
        noise = torch.randn_like(x0)
        noisy = 0.5 * x0 + 0.5 * noise
        kw = self._inputs(b)
        with self.autocast():
            (blocks,) = self.controlnet(hidden_states=noisy, controlnet_cond=cond, return_dict=False, **kw)
            pred = self.transformer(
                hidden_states=noisy,
                block_controlnet_hidden_states=[s.to(self.dtype) for s in blocks],
                return_dict=False,
                **kw,
            )[0]
        return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())

    @torch.no_grad()
    def validate(self) -> None:
        """The prompt and the negative one through the three encoders (``validation_text_encoders``;
        else their embeddings come to the GPU), the control image through the VAE's encoder, one
        denoising step with classifier-free guidance (a doubled batch), then the VAE decoding."""
        n, res = self.spec.validation_images, self.spec.validation_resolution or self.spec.resolution
        t5 = self.spec.max_sequence_length or DEFAULT_T5_TOKENS["sd3"]
        if self.spec.validation_text_encoders:
            for name, enc in self.for_validation.items():
                if name.startswith("text_encoder"):
                    enc(torch.randint(0, 1000, (2 * n, t5 if name == "text_encoder_3" else self.CLIP_TOKENS)))
        lat = res // self.down
        with self.autocast():  # the control image, doubled for guidance before the pipeline encodes it
            cond = _encode_control(self.vae, 2 * n, res, self.dtype, self.spec.vae_slicing)
        x = torch.randn(2 * n, self.latent_channels, lat, lat).to(self.dtype)
        kw = self._inputs(2 * n)
        with self.autocast():
            (blocks,) = self.controlnet(hidden_states=x, controlnet_cond=cond, return_dict=False, **kw)
            self.transformer(hidden_states=x, block_controlnet_hidden_states=blocks, return_dict=False, **kw)
        del blocks, cond
        with self.autocast():
            for _ in range(n if self.spec.vae_slicing else 1):
                self.vae.decode(torch.randn(1 if self.spec.vae_slicing else n, self.latent_channels, lat, lat).to(self.dtype))


def _encode_control(vae, n: int, res: int, dtype: torch.dtype, slicing: bool) -> torch.Tensor:
    """The transformer pipelines' control image through the VAE's encoder (``AutoencoderKL.encode``:
    one image at a time with slicing): ``n`` latents, as the denoiser's dtype."""
    if slicing:
        parts = [vae.encode(torch.rand(1, 3, res, res).to(dtype)).latent_dist.sample() for _ in range(n)]
        return torch.cat(parts).to(dtype)
    return vae.encode(torch.rand(n, 3, res, res).to(dtype)).latent_dist.sample().to(dtype)


def transformer_class(arch: str) -> str | None:
    """The class of architecture ``arch``'s transformer (None: a UNet base, or the demo's tiny one)."""
    import json

    from ..models.architectures import folder_of

    if arch == "tiny":
        return None
    config = folder_of(arch) / "transformer" / "config.json"
    return json.loads(config.read_text()).get("_class_name") if config.is_file() else None


TRANSFORMER_FAMILIES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}


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
    key = (
        spec.arch,
        spec.mixed_precision,
        spec.deepspeed,
        spec.per_step_encoding,
        spec.flux_layers,
        spec.sd3_layers,
        spec.vae_force_upcast,
        spec.frozen_fp8,
    )
    m = _BUILT.get(key)
    if m is None:
        family = TRANSFORMER_FAMILIES.get(transformer_class(spec.arch) or "", "unet")
        if family == "unet" and transformer_class(spec.arch):
            raise ValueError(f"architecture {spec.arch!r}: the planner knows no {transformer_class(spec.arch)}")
        m = _BUILT[key] = {"flux": _FluxModels, "sd3": _SD3Models, "unet": _UNetModels}[family](spec)
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

    def gradient_ready(p: torch.Tensor) -> None:
        if spec.deepspeed:
            # ZeRO-2 with the optimizer offloaded (deepspeed/runtime/zero/stage_1_and_2.py,
            # reduce_independent_p_g_buckets_and_remove_grads, copy_grads_in_partition): each
            # gradient is copied into the reduce bucket (``terms``' deepspeed_buckets) as it is
            # produced, its own storage freed, and the bucket emptied to the CPU's fp32 partition
            p.grad = None
        else:
            mem.regroup(p.grad, "gradients")

    hooks = [p.register_post_accumulate_grad_hook(gradient_ready) for p in params]
    keep_grads = not spec.set_grads_to_none or spec.accumulation > 1  # accumulation keeps them between micro-steps
    for _ in range(2):
        loss = m.training_loss()
        loss.backward()
        del loss
        if not spec.deepspeed:  # DeepSpeed clips the CPU partition
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
        _TRACKER.append(mem)  # layerwise casting's hooks file their copies here
        try:
            with mem:
                weights = _register_weights(mem, {"controlnet": m.controlnet, **m.frozen})
                opt = _train_steps(m, mem, spec)
                step_peak, step_groups = mem.peak, dict(mem.peak_groups)
                if spec.set_grads_to_none:
                    for p in m.controlnet.parameters():
                        p.grad = None
                mem.reset_peak()
                validation_start = mem.current
                loading = m.for_validation
                if not spec.validation_text_encoders:
                    loading = {k: v for k, v in loading.items() if not k.startswith("text_encoder")}
                loaded = _register_weights(mem, loading)
                weights.update(loaded)
                m.controlnet.eval()
                m.validate()
                validation_peak, validation_groups = mem.peak, dict(mem.peak_groups)
                del opt
        finally:
            _TRACKER.remove(mem)
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
            frozen_names=tuple(m.frozen),
            frozen_block_bytes=max((local_bytes(b) for model in m.frozen.values() for b in frozen_blocks(model)), default=0),
        )


def spec_dict(spec: StepSpec) -> dict:
    return asdict(spec)
