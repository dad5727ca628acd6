"""What a model family supplies (:class:`Family`) and what it loads (:class:`BaseComponents`).

A family is what differs between base generations: its components, how captions become the
denoiser's text conditioning, how the condition enters the ControlNet (pixels, or VAE latents),
the training objective (epsilon / v-prediction, or flow matching), the ControlNet it builds and
its pipelines. The stages and the trainer ask the base's family and never name one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ...core.config import TrainCfg
    from ...objectives.diffusion import Noised, Objective

TEXT = "text_embedding"  # every family's per-token caption embedding (the cache's column)
POOLED = "pooled_embedding"  # one vector per caption (SDXL, SD3: CLIP's projections; Flux: CLIP-L's pooled output)
CONTROL = "control"  # the cache's control-image latent columns: control_mean, control_std (control_latents families)


@dataclass(frozen=True)
class LatentSpace:
    """How the VAE's posterior samples become the model's latents: (sample - shift) x scale."""

    scaling_factor: float
    shift_factor: float = 0.0


@dataclass
class BaseComponents:
    """A base model's parts, as its pipeline folder holds them; ``family`` names whose they are."""

    family: str
    tokenizer: object
    text_encoder: object
    vae: object
    denoiser: object  # the frozen model the ControlNet steers: a UNet (sd, sdxl) or a transformer (sd3, flux)
    noise_scheduler: object
    tokenizer_2: object | None = None  # SDXL's, SD3's second text encoder (OpenCLIP bigG); Flux's T5
    text_encoder_2: object | None = None
    tokenizer_3: object | None = None  # SD3's T5
    text_encoder_3: object | None = None
    options: dict = field(default_factory=dict)  # the pipeline's own settings (SDXL: force_zeros_for_empty_prompt)
    max_sequence_length: int | None = None  # T5 tokens per caption (sd3, flux)

    @property
    def text_encoders(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]


def compute_dtype(model) -> torch.dtype:
    """The dtype a frozen model computes in: its frozen floating weights' (those stored in fp8 or
    quantised are cast to it layer by layer; its norms keep it)."""
    import torch

    computes = (torch.float32, torch.float16, torch.bfloat16)
    return next((p.dtype for p in model.parameters() if not p.requires_grad and p.dtype in computes), torch.float32)


class Family:
    """The base class: a family overrides what differs. Subclasses are stateless singletons."""

    name: str
    title: str  # for people (the model card)
    hub_tag: str  # the Hub's tag for models of this family
    pipelines: tuple[str, ...]  # diffusers pipeline classes whose model_index.json names this family
    pipeline_class: str  # text-to-image, for the base alone
    controlnet_pipeline_class: str  # what loads the trained ControlNet (model card, generate)
    controlnet_class: str  # the diffusers class of the trained ControlNet
    new_layers: tuple[str, ...]  # the ControlNet's own layers (not copied from the base): new_layers_lr_multiplier's
    shifts_latents: bool = False  # the VAE's latents are shifted (shift_factor) as well as scaled
    denoiser_name: str  # the denoiser's name in the pipeline folder: unet | transformer
    size_multiple: int  # image sides must be multiples of this (the VAE's and the denoiser's downsampling)
    cache_parts: tuple[str, ...]  # the base's subfolders the latent cache depends on
    text_features: tuple[str, ...]  # the cache's per-caption feature columns, TEXT first
    control_latents: bool = False  # the condition enters as VAE latents (cached, sampled per step), not pixels
    control_argument: str = "image"  # the ControlNet pipeline's argument for the condition image
    default_max_sequence_length: int | None = None  # T5 tokens per caption (the families with a T5)
    # a transformer family's ControlNet: (blocks, single-stream blocks) it copies when params say null
    default_layers: tuple[int, int] | None = None
    # the GPU-memory planner's view: a measured.MeasuredModels subclass that builds the family's
    # full-size models on fake tensors and runs one training step and one validation pass
    measured: type

    def describe_layers(self, blocks: int, single: int) -> str:
        """What a ControlNet of ``default_layers``' shape copies, for the planner's table."""
        return f"{blocks} blocks"

    # train's objective levers at the values of upstream's script for this family (the other levers'
    # upstream values are the same for every family: docs/benchmarks.md, Time to control)
    upstream_objective: dict = {"timestep_sampling": "uniform", "loss_weighting": "none"}

    def load(
        self, name_or_path: str, revision: str | None, vae: str | None = None, max_sequence_length: int | None = None
    ) -> BaseComponents:
        raise NotImplementedError

    def tiny_text_encoder(self, vocab_size: int):
        """The tiny base's first text encoder (models/tiny.py), built before the VAE."""
        from .. import tiny

        return tiny.build_text_encoder(vocab_size)

    def tiny_components(
        self, tokenizer, vocab_size: int, text_encoder, vae, resolution: int, layers_per_block: int = 1
    ) -> BaseComponents:
        """The embedded default's base of this family around its first text encoder and its
        (trained) VAE: the rest built untrained by models/tiny.py (a UNet of ``layers_per_block``
        resnets per block; the transformers ignore it)."""
        raise NotImplementedError

    # --- training: the objective, the ControlNet, one prediction ---
    def tiny_objective(self, snr_gamma: float | None) -> Objective:
        """How the base stage trains the tiny base's denoiser (``base.tiny.unet_snr_gamma``)."""
        raise NotImplementedError

    def objective(self, objective: Objective) -> Objective:
        """``objective`` as this family trains it (flow families set SD3's preconditioning)."""
        return objective

    def noise(self, scheduler, x0: torch.Tensor, generator, objective: Objective) -> Noised:
        raise NotImplementedError

    def output(self, pred: torch.Tensor, noised: Noised, objective: Objective) -> torch.Tensor:
        """What the loss compares with ``noised.target`` (flow matching's preconditioning)."""
        return pred

    def make_controlnet(self, base: BaseComponents, t: TrainCfg):
        """The ControlNet initialised from the frozen denoiser, its size from ``t``."""
        raise NotImplementedError

    def control_input(self, batch: dict, latents: LatentSpace, generator, device) -> torch.Tensor:
        """The condition as the ControlNet takes it, for a training batch."""
        return batch["conditioning"].to(device)

    def noise_and_control(self, scheduler, x0, batch: dict, latents: LatentSpace, generator, objective: Objective, device):
        """(:meth:`noise`, :meth:`control_input`), drawn in the order upstream's script draws them
        (SD3's: the noise and timesteps, then the condition's latents)."""
        noised = self.noise(scheduler, x0, generator, objective)
        return noised, self.control_input(batch, latents, generator, device)

    def residuals(self, controlnet, noised: Noised, text: dict, batch: dict, control: torch.Tensor, device):
        """The ControlNet's outputs, which :meth:`predict` adds to the denoiser's."""
        raise NotImplementedError

    def predict(self, denoiser, noised: Noised, text: dict, batch: dict, residuals, dtype, device) -> torch.Tensor:
        """The frozen denoiser's output in the latents' layout (``residuals`` None: the base alone)."""
        raise NotImplementedError

    # Several processes (DDP): the transformer ControlNets hold parameters that no loss reaches (the
    # last block's text-stream outputs), which DDP must be told to look for each step.
    unused_parameters = False

    # Validation: the SD families' pipelines encode the prompts on the GPU (their text encoders are
    # small); the transformer families' prompts are encoded on the CPU (T5-XXL is 9.5 GB in bf16).
    encodes_prompts_on_device = True

    def validation_inputs(
        self, base: BaseComponents, prompt: str, n: int, guidance_scale: float, conditions, device, dtype
    ) -> dict:
        """The pipeline call's inputs but the seeds and the size, for ``n`` images of one prompt."""
        return {"prompt": [prompt] * n, **self.sampling_kwargs(base, n, guidance_scale, conditions)}

    def sampling_kwargs(self, base: BaseComponents, n: int, guidance_scale: float, conditions=None, scale: float = 1.0) -> dict:
        """The pipeline call's arguments besides the prompts, seeds and size, for ``n`` prompts."""
        kw = {"guidance_scale": guidance_scale}
        if conditions is not None:
            kw.update({self.control_argument: conditions, "controlnet_conditioning_scale": scale})
        return kw

    def encode(self, base: BaseComponents, captions: list[str]) -> dict[str, torch.Tensor]:
        """Each caption's text features, ``text_features`` as keys, float32 on the CPU."""
        raise NotImplementedError

    def image_features(self, images: list, resolution: int) -> dict[str, torch.Tensor]:
        """Per-image conditioning besides the latents (SDXL: time ids), for the cache; PIL images."""
        return {}

    def added_cond_kwargs(self, text: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], device) -> dict | None:
        """The UNet's and the ControlNet's extra conditioning for a training batch (None: none)."""
        return None

    def pipeline_parts(self, base: BaseComponents, scheduler=None) -> dict:
        """The base's components as the family's pipelines take them (a sampling scheduler)."""
        raise NotImplementedError

    def pipeline(self, base: BaseComponents, controlnet=None, scheduler=None):
        """The family's text-to-image pipeline, or with ``controlnet`` its ControlNet pipeline
        (other kinds of control build theirs: adapters/)."""
        import diffusers

        parts = self.pipeline_parts(base, scheduler)
        if controlnet is None:
            return getattr(diffusers, self.pipeline_class)(**parts)
        return getattr(diffusers, self.controlnet_pipeline_class)(controlnet=controlnet, **parts)

    def caption_features(
        self, base: BaseComponents, captions: list[str], batch_size: int = 64
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(per-caption features, the empty caption's), encoding each distinct caption once."""
        import torch

        unique = sorted(set(captions)) + [""]
        parts = [self.encode(base, unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
        feats = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        row = {c: i for i, c in enumerate(unique[:-1])}
        idx = [row[c] for c in captions]
        return {k: v[idx] for k, v in feats.items()}, {k: v[-1:] for k, v in feats.items()}


def tokenize(tokenizer, texts: list[str], device) -> torch.Tensor:
    """Padded to the tokenizer's length and truncated, as the pipelines tokenize prompts."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
