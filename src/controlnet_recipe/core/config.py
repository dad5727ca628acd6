"""The one typed configuration. Reads params.yaml, checks every key, resolves the recipe and tier.

Errors are one line naming the file, the key and what was expected (:class:`ConfigError`), and
they happen before any model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError


class ConfigError(RecipeError, ValueError):
    """A bad params file: the message is one line, naming the key and what was expected."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Positive = Field(gt=0)


class Columns(Strict):
    image: str
    conditioning_image: str
    caption: str


class DataCfg(Strict):
    """Where the images come from. ``synthetic`` renders faces; the others read real data:
    ``facesynthetics`` (archive URL, zip or folder), ``hub`` (a dataset id or a local folder in the
    hub's layout), ``imagefolder`` (side captions, optional conditioning folder), ``parquet``."""

    source: Literal["synthetic", "facesynthetics", "hub", "imagefolder", "parquet"]
    location: str | None  # URL, file, folder, glob or hub id; null for synthetic
    revision: str | None  # hub revision
    sha256: str | None  # checksum of a downloaded archive
    source_columns: dict[str, str]  # source column -> image | conditioning_image | caption (hub, parquet)
    conditioning_folder: str | None  # imagefolder: a parallel folder of conditioning images
    resolution: int = Positive
    num_train: int | None = Field(gt=0)  # max training samples (synthetic: how many to render); null: all
    num_validation: int = Positive  # held-out samples, chosen by a seeded hash of each sample's id
    seed: int
    shard_size: int = Positive  # samples per shard: the unit of resuming
    min_size: int = Positive  # images smaller than this (either side) are skipped
    undecodable_captions: Literal["empty", "skip"]  # a caption file in no known encoding: keep the sample uncaptioned, or skip it
    buckets: Literal["off", "auto"] | list[str]  # off: square at resolution | auto | ["WxH", ...] (core/buckets.py)
    max_aspect: float = Field(ge=1)  # with buckets: images longer than this:1 are skipped (and auto's buckets stop here)

    @field_validator("buckets")
    @classmethod
    def _bucket_sizes(cls, v):
        if isinstance(v, list):
            from .buckets import parse

            if not v:
                raise ValueError("expected off, auto or a list of WIDTHxHEIGHT, got an empty list")
            for s in v:
                try:
                    parse(s)
                except ValueError as e:
                    raise ValueError(str(e).removeprefix("data.buckets: ")) from None
        return v

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"expected a multiple of 8, got {v}")
        return v

    @model_validator(mode="after")
    def _located(self) -> DataCfg:
        if self.source == "synthetic" and not self.num_train:
            raise ConfigError("num_train: expected how many faces to render for the synthetic source")
        if self.source != "synthetic" and not self.location:
            raise ConfigError(f"location: expected a URL, file, folder or id for source {self.source!r}")
        bad = {v for v in self.source_columns.values()} - {"image", "conditioning_image", "caption"}
        if bad:
            raise ConfigError(f"source_columns: expected values among image, conditioning_image, caption, got {sorted(bad)}")
        return self


class ConditionsCfg(Strict):
    """The condition kind (one module each in ``conditions/``): ``face_segmentation``: landmarks
    (``detector``: the source's ground truth, dlib or SPIGA) drawn into the face-part map;
    ``canny``: OpenCV edges; ``given``: the source's own images (``map_type``: what they are, or
    ``auto`` to read it from them); ``depth``, ``segmentation``: a transformers model (``model``,
    ``revision``) makes them, batched; the evaluation re-extracts them with ``reextract_model``."""

    kind: Literal["face_segmentation", "face_depth", "canny", "given", "depth", "segmentation"]
    detector: Literal["ground_truth", "dlib", "spiga"]
    canny_low: int = Field(ge=0, le=255)
    canny_high: int = Field(ge=0, le=255)
    map_type: Literal["auto", "categorical", "binary", "continuous"] = "auto"
    model: str | None = None  # depth, segmentation: a hub id or a local folder
    revision: str | None = None
    reextract_model: str | None = None  # null: the model that made the conditions
    batch_size: int = Field(default=16, gt=0)
    num_proc: int | None = Field(gt=0)  # worker processes; null: every core

    @model_validator(mode="after")
    def _model_for_model_made(self) -> ConditionsCfg:
        if self.kind in ("depth", "segmentation") and not self.model:
            raise ConfigError(f"conditions.model: expected a transformers model id or folder for kind {self.kind}")
        return self


class CaptionsCfg(Strict):
    """``attributes`` (synthetic faces), ``blip``, ``template``, ``given`` (the source's), ``none``."""

    captioner: Literal["attributes", "blip", "template", "given", "none"]
    model: str  # blip: a hub id or a local folder
    revision: str | None
    batch_size: int = Positive
    template: str
    prefix: str
    suffix: str


class PhotorealCfg(Strict):
    """The source recipe's next step: img2img every image through Stable Diffusion before the
    conditions are drawn, so synthetic renders look photographic. Off by default."""

    enabled: bool
    model: str
    revision: str | None
    prompt: str
    strength: float = Field(gt=0, le=1)
    num_inference_steps: int = Positive
    guidance_scale: float = Field(ge=1)
    batch_size: int = Positive
    seed: int


class TinyBaseCfg(Strict):
    vae_steps: int = Positive
    vae_batch_size: int = Positive
    vae_learning_rate: float = Positive
    unet_steps: int = Positive
    unet_batch_size: int = Positive
    unet_learning_rate: float = Positive
    unet_snr_gamma: float | None = Field(gt=0)  # min-SNR-gamma loss weighting for the tiny UNet; null: plain MSE
    layers_per_block: int = Field(
        ge=1, le=2
    )  # the tiny UNet's resnets per block: 1 (the demo's) | 2 (SD's, what controlnet_xs needs)
    seed: int


class BaseCfg(Strict):
    """The frozen base. ``family``: ``auto`` reads the pipeline class from the model's
    model_index.json (the tiny base: SD); ``sd`` (1.x, 2.x), ``sdxl``, ``sd3`` or ``flux`` names it. ``vae``: a VAE
    loaded in place of the base's own (SDXL: an fp16-fixed VAE such as madebyollin/sdxl-vae-fp16-fix)."""

    pretrained_model: str | None
    revision: str | None
    family: str  # auto, or a family that tiers are sized for (checked with the tiers, in load_config)
    vae: str | None
    max_sequence_length: int | None = Field(gt=0)  # T5 tokens per caption (sd3, flux); null: the family's default
    quantize: Literal["none", "fp8", "int8", "nf4"]  # the frozen base while training (training/quantize.py)
    tiny: TinyBaseCfg


class CacheCfg(Strict):
    batch_size: int = Positive  # images per VAE / text-encoder batch
    shard_size: int = Positive  # samples per shard (the unit of resuming)


class EvaluatorCfg(Strict):
    """The models the evaluation scores images with. A condition extractor (validation's
    val/fidelity) is always trained on the training pairs; face landmarks are re-detected by a
    heatmap network trained the same way (``learned``) or by dlib; CLIP (prompt adherence, zero-shot
    probes, FID/KID features) is a pretrained model pinned by revision and sha256, or (``clip_model: null``) a small CLIP trained
    on the (image, caption) pairs."""

    num_samples: int = Positive  # training pairs it learns from
    width: int = Field(gt=0, multiple_of=4)
    steps: int = Positive
    batch_size: int = Positive
    learning_rate: float = Positive
    landmarks: Literal["learned", "dlib"]
    landmark_steps: int = Positive
    clip_model: str | None  # hub id or folder; null: train a small CLIP here
    clip_revision: str | None
    clip_sha256: str | None  # sha256 of the CLIP weights file; checked after download
    clip_steps: int = Positive


class ValidationCfg(Strict):
    """Images generated during training (upstream's --validation_image / --validation_prompt).

    ``images`` and ``prompts`` pair as upstream's do: N:N, 1:N or N:1. With no ``images``, the
    first ``held_out`` conditions of the validation split are used, with their captions unless
    ``prompts`` are given."""

    steps: int = Positive
    images: list[str]
    prompts: list[str]
    held_out: int = Field(ge=0)
    num_images: int = Positive  # images per (condition, prompt) pair
    num_inference_steps: int = Positive
    guidance_scale: float = Field(ge=1)

    @model_validator(mode="after")
    def _pairs(self) -> ValidationCfg:
        ni, npr = len(self.images), len(self.prompts)
        if ni and npr and ni != npr and 1 not in (ni, npr):
            raise ConfigError(f"expected as many images as prompts (or one of either), got {ni} images and {npr} prompts")
        if not ni and not self.held_out:
            raise ConfigError("expected images, or held_out > 0 to use held-out conditions")
        if not ni and npr not in (0, 1, self.held_out):
            raise ConfigError(f"expected 0, 1 or held_out={self.held_out} prompts for held-out conditions, got {npr}")
        return self


Tracker = Literal["dvclive", "tensorboard", "wandb"]


class TrainCfg(Strict):
    seed: int
    max_train_steps: int | None = Field(gt=0)
    num_train_epochs: int | None = Field(gt=0)
    batch_size: int = Positive  # effective batch: micro-batch x accumulation x processes
    learning_rate: float = Positive
    scale_lr: bool
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
    lr_warmup_steps: int = Field(ge=0)
    lr_num_cycles: int = Positive
    lr_power: float = Positive
    adam_beta1: float = Field(ge=0, lt=1)
    adam_beta2: float = Field(ge=0, lt=1)
    adam_weight_decay: float = Field(ge=0)
    adam_epsilon: float = Positive
    max_grad_norm: float = Positive
    allow_tf32: bool
    proportion_empty_prompts: float = Field(ge=0, le=1)
    dataloader_num_workers: int = Field(ge=0)
    checkpointing_steps: int = Positive
    checkpoints_total_limit: int | None = Field(gt=0)
    resume_from_checkpoint: str | None  # "latest", a checkpoint folder, or null to start fresh
    validation: ValidationCfg
    report_to: list[Tracker]
    tracker_project_name: str
    shuffle_conditions: bool  # a planted failure: each image gets another sample's condition
    # Convergence levers; upstream's values: uniform, none, ema_decay null, multiplier 1, hint_init zero.
    timestep_sampling: Literal["uniform", "cubic", "logit_normal", "mode"]  # mode: flow matching only
    logit_mean: float  # logit_normal only
    logit_std: float = Positive
    mode_scale: float  # mode only
    flow_shift: float | None = Field(
        gt=0
    )  # flow matching: sigma -> shift*sigma / (1 + (shift-1)*sigma); null: the scheduler's own sigmas
    loss_weighting: Literal[
        "none", "min_snr", "sigma_sqrt", "cosmap"
    ]  # min_snr: epsilon/v-prediction; sigma_sqrt, cosmap: flow matching
    snr_gamma: float = Positive  # min_snr only
    ema_decay: float | None = Field(gt=0, lt=1)  # null: no EMA; else validation, checkpoints' sweep weights and export use it
    new_layers_lr_multiplier: float = Positive  # the zero convolutions and the hint encoder train at learning_rate x this
    # the condition's embedder (SD: the hint encoder's output conv): zero (upstream), PyTorch's default init, or
    # (SD3, Flux, whose condition is a latent like the image) a copy of the base's own latent embedder
    hint_init: Literal["zero", "random", "copy"]
    condition_loss_weight: float = Field(ge=1)  # the MSE's weight under the condition's drawing (1: upstream's plain MSE)
    # The transformer families' ControlNet: how many of the base's blocks it copies (null: the family's default)
    controlnet_layers: int | None = Field(gt=0)  # sd3: joint blocks; flux: double-stream blocks
    controlnet_single_layers: int | None = Field(ge=0)  # flux: single-stream blocks

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainCfg:
        if (self.max_train_steps is None) == (self.num_train_epochs is None):
            raise ConfigError("expected exactly one of max_train_steps and num_train_epochs, the other null")
        return self


class AdapterCfg(Strict):
    """The kind of control the train stage trains (one module each in ``adapters/``) and its
    settings; a kind reads some of them and the others must be null (adapters/adapter.py)."""

    kind: Literal["controlnet", "controlnet_lora", "t2i_adapter", "controlnet_xs", "control_lora"]
    num_res_blocks: int | None = Field(gt=0)  # t2i_adapter: residual blocks per level (null: 2, diffusers' default)
    rank: int | None = Field(gt=0)  # controlnet_lora, control_lora: the LoRA's rank (null: 16)
    alpha: float | None = Field(gt=0)  # controlnet_lora: its scale is alpha / rank (null: alpha = rank)
    lora_layers: Literal["attention", "all"] | None  # controlnet_lora: which copied layers (null: all, convolutions too)
    size_ratio: float | None = Field(gt=0, le=1)  # controlnet_xs: its widths / the UNet's (null: 0.25)


class Probe(Strict):
    """An off-domain prompt for the forgetting check; ``concept`` is its CLIP zero-shot label
    (the prompt itself when null)."""

    prompt: str
    concept: str | None = None


class SweepCfg(Strict):
    """Every saved checkpoint on a cheaper subset; the chosen one is the earliest whose fidelity is
    within ``tolerance`` (relative) of the best and whose forgetting is at most ``max_forgetting``."""

    num_samples: int = Positive
    tolerance: float = Field(ge=0, lt=1)
    max_forgetting: float = Field(ge=0, le=1)


class EvaluateCfg(Strict):
    num_samples: int = Positive
    num_inference_steps: int = Positive
    guidance_scale: float = Field(ge=1)
    conditioning_scale: float = Field(ge=0)
    seed: int
    grid_rows: int = Positive
    probes: list[Probe]
    probe_conditions: int = Positive  # held-out conditions each probe prompt is generated with
    sweep: SweepCfg
    bootstrap: int = Field(ge=100)  # resamples for the confidence intervals
    push_to_hub: bool  # upload the chosen checkpoint and its model card at the end of this stage
    hub_model_id: str | None

    @model_validator(mode="after")
    def _hub_id(self) -> EvaluateCfg:
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("expected hub_model_id (user/name) when push_to_hub is true")
        return self


class Recipe(Strict):
    columns: Columns
    data: DataCfg
    photoreal: PhotorealCfg
    conditions: ConditionsCfg
    captions: CaptionsCfg
    base: BaseCfg
    cache: CacheCfg
    evaluator: EvaluatorCfg
    adapter: AdapterCfg
    train: TrainCfg
    evaluate: EvaluateCfg

    @model_validator(mode="after")
    def _stages_fit_the_source(self) -> Recipe:
        src, given = self.data.source, set(self.data.source_columns.values())
        if self.data.conditioning_folder:
            given.add("conditioning_image")
        if (
            self.conditions.kind in ("face_segmentation", "face_depth")
            and self.conditions.detector == "ground_truth"
            and src
            not in (
                "synthetic",
                "facesynthetics",
            )
        ):
            raise ConfigError(
                f"conditions.detector: ground_truth needs landmarks from the source, {src!r} has none (use dlib or spiga)"
            )
        if self.conditions.kind == "given" and "conditioning_image" not in given:
            raise ConfigError(
                "conditions.kind: given needs conditioning images from the source (data.source_columns or conditioning_folder)"
            )
        if self.captions.captioner == "given" and "caption" not in given and src != "imagefolder":
            raise ConfigError("captions.captioner: given needs captions from the source (data.source_columns)")
        if self.captions.captioner == "attributes" and src != "synthetic":
            raise ConfigError(f"captions.captioner: attributes only exist for the synthetic source, not {src!r}")
        return self


class Tier(Strict):
    """A GPU's switches. ``family``: the model family the tier is sized for (null: every family, the
    cpu tier); ``memory_gb``: the card it is sized for, per GPU (null: no budget, the cpu tier)."""

    family: str | None
    memory_gb: int | None = Field(gt=0)
    batch_size: int = Positive
    gradient_checkpointing: bool
    use_8bit_adam: bool
    set_grads_to_none: bool
    mixed_precision: Literal["no", "fp16", "bf16"]
    attention: Literal["sdpa", "xformers"]
    deepspeed: Literal["zero2"] | None  # ZeRO-2 with the optimizer offloaded to CPU
    channels_last: bool  # ControlNet, frozen UNet and their inputs in channels_last memory format
    compile: bool  # torch.compile the ControlNet and the frozen UNet (in place: checkpoints keep their keys)
    frozen_fp8: bool  # the frozen base's weights stored in fp8 (diffusers' layerwise casting), computed in mixed precision
    shard_frozen: bool = False  # several GPUs: the frozen base sharded across them, block by block (FSDP2)

    @model_validator(mode="after")
    def _works_together(self) -> Tier:
        if self.deepspeed and self.use_8bit_adam:
            raise ConfigError(
                "use_8bit_adam: expected false with deepspeed (bitsandbytes' 8-bit Adam does not run under DeepSpeed)"
            )
        if self.shard_frozen and (self.deepspeed or self.frozen_fp8):
            raise ConfigError("shard_frozen: expected deepspeed null and frozen_fp8 false with it (FSDP2 shards bf16 weights)")
        return self


class Params(Strict):
    recipe: str
    gpu: str
    tiers: dict[str, Tier]

    @model_validator(mode="after")
    def _known_tier(self) -> Params:
        known = list(self.tiers)
        if self.gpu != "auto" and self.gpu not in self.tiers:
            raise ConfigError(f"gpu: unknown tier {self.gpu!r}, expected one of auto, {', '.join(known)}")
        return self

    @property
    def families(self) -> list[str]:
        """The families that tiers are sized for, in the order params.yaml lists them."""
        return list(dict.fromkeys(t.family for t in self.tiers.values() if t.family))


class Config(Strict):
    """What a stage needs: the selected recipe and the tier (``None`` while ``gpu: auto``)."""

    recipe_name: str
    recipe: Recipe
    gpu: str
    tiers: dict[str, Tier]

    @property
    def family(self) -> str:
        """The base's family as params name it (``auto`` counts as ``sd`` until the base stage knows)."""
        return "sd" if self.recipe.base.family == "auto" else self.recipe.base.family

    @property
    def tier(self) -> Tier:
        return self.tiers[resolve_tier(self.gpu, self.family, self.tiers)]


def check_tier(gpu: str, family: str, tiers: dict[str, Tier], where: str = "params.yaml") -> None:
    """A tier sized for another family stops a run here, before any model loads (an SD tier
    under an SDXL base, say); ``auto`` and a tier of no family (``cpu``) fit every family."""
    if family == "auto" or gpu == "auto" or tiers[gpu].family in (None, family):
        return
    mine = ", ".join(t for t, x in tiers.items() if x.family == family)
    raise ConfigError(
        f"{where}: gpu: tier {gpu!r} is sized for family {tiers[gpu].family}; a base of family {family} needs one of {mine}"
    )


def detect_tier(family: str, tiers: dict[str, Tier]) -> str:
    """The largest one-GPU tier of ``family`` whose ``memory_gb`` fits the first CUDA device
    (the first listed of equals); ``cpu`` without one."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    gb = torch.cuda.get_device_properties(0).total_memory / 1024**3
    mine = {t: x.memory_gb for t, x in tiers.items() if x.family == family and x.memory_gb and not x.shard_frozen}
    fitting = [t for t, m in mine.items() if m <= gb + 0.5]
    if fitting:
        return max(fitting, key=mine.get)
    if family != "sd":
        least = min(mine.values())
        raise ConfigError(
            f"gpu: auto: the GPU has {gb:.0f} GB; a base of family {family} needs at least {least} GB ({', '.join(mine)})"
        )
    return min(mine, key=mine.get)  # SD's smallest tier, which DeepSpeed or a lower resolution may still fit


def resolve_tier(gpu: str, family: str, tiers: dict[str, Tier]) -> str:
    return detect_tier(family, tiers) if gpu == "auto" else gpu


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    kind = err["type"]
    if kind == "missing":
        what = "missing key"
    elif kind == "extra_forbidden":
        what = "unknown key"
    else:
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
        what = f"expected {msg}" if not msg.startswith("expected") else msg
        if "input" in err and kind != "value_error":
            what += f", got {err['input']!r}"
    return f"{loc}: {what}" if loc else what


def _validate(model: type[BaseModel], data: Any, where: str, prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {prefix}{e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        if isinstance(first.get("ctx", {}).get("error"), ConfigError):
            loc = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"{where}: {prefix}{loc + ': ' if loc else ''}{first['ctx']['error']}") from None
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"{where}: {prefix}{_describe(first)}{more}") from None


def load_config(path: str | Path = "params.yaml", overrides: dict[str, str] | None = None) -> Config:
    """Read and check ``path``. ``overrides`` replace top-level scalars (``gpu``, ``recipe``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = {**raw, **(overrides or {})}
    for key in ("recipe", "gpu", "tiers"):
        if key not in raw:
            raise ConfigError(f"{path}: {key}: missing key")
    name = raw["recipe"]
    if not isinstance(name, str) or not isinstance(raw.get(name), dict):
        blocks = [k for k, v in raw.items() if isinstance(v, dict) and k != "tiers"]
        raise ConfigError(f"{path}: recipe: expected the name of a recipe block ({', '.join(blocks)}), got {name!r}")
    params = _validate(Params, {k: raw[k] for k in ("recipe", "gpu", "tiers")}, str(path))
    recipe = _validate(Recipe, raw[name], str(path), prefix=f"{name}.")
    if recipe.base.family != "auto" and recipe.base.family not in params.families:
        raise ConfigError(
            f"{path}: {name}.base.family: expected auto or a family that tiers are sized for "
            f"({', '.join(params.families)}), got {recipe.base.family!r}"
        )
    check_tier(params.gpu, recipe.base.family, params.tiers, str(path))
    return Config(recipe_name=name, recipe=recipe, gpu=params.gpu, tiers=params.tiers)


def accumulation_steps(effective_batch: int, micro_batch: int, num_processes: int = 1) -> tuple[int, int]:
    """(micro-batch, accumulation) that give exactly ``effective_batch`` samples per optimizer step."""
    micro = min(micro_batch, effective_batch // num_processes or 1)
    per_step = micro * num_processes
    if effective_batch % per_step:
        raise ConfigError(
            f"train.batch_size: expected a multiple of micro-batch {micro} x {num_processes} process(es), got {effective_batch}"
        )
    return micro, effective_batch // per_step
