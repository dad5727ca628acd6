"""Control-LoRA by channel concatenation (diffusers' ``examples/flux-control``; Black Forest Labs'
FLUX.1-Canny-dev-lora and FLUX.1-Depth-dev-lora): the transformer's input embedder is widened to
take the condition's packed latents beside the image's (the new columns start at zero, so the base
is unchanged at step 0), and a LoRA on the transformer (the widened embedder's at full rank) learns
to use them. Nothing is copied: the trained part is the LoRA. It is saved as a LoRA file that
``FluxControlPipeline.load_lora_weights`` loads, widening the base's embedder as it loads.

Only Flux has a stock pipeline for this (``FluxControlPipeline``); SD3 has none, so it is Flux's."""

from __future__ import annotations

import torch

from ..models.families.family import compute_dtype
from .adapter import Adapter
from .controlnet_lora import DEFAULT_RANK, lora_targets

EMBEDDER = "x_embedder"  # the transformer's input projection, widened
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name (save_lora_weights)
SEP = "|"  # parameter names as ParameterDict keys ('.' is not allowed there)


class ControlLoRAModel(torch.nn.Module):
    """The trained part of a Control-LoRA: the transformer's trainable parameters (its LoRA),
    registered here as well, so that checkpoints and the optimizer hold them and not the frozen
    12B; ``forward`` runs the whole transformer. Moving this moves the transformer."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.__dict__["transformer"] = transformer  # not a submodule: its frozen weights stay out of the state
        trained = {n.replace(".", SEP): p for n, p in transformer.named_parameters() if p.requires_grad}
        self.trained = torch.nn.ParameterDict(trained)

    def forward(self, **inputs):
        return self.transformer(**inputs, return_dict=False)[0]

    def _apply(self, fn, recurse=True):
        self.transformer._apply(fn, recurse)
        return super()._apply(fn, recurse)


def widen(transformer: torch.nn.Module) -> None:
    """The input embedder takes twice its channels (the condition's latents after the image's):
    the base's weights for the first half, zeros for the second, as upstream's script and
    ``load_lora_weights`` widen it."""
    old = getattr(transformer, EMBEDDER)
    new = torch.nn.Linear(2 * old.in_features, old.out_features, bias=old.bias is not None, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_features] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.requires_grad_(False)
    setattr(transformer, EMBEDDER, new)
    transformer.register_to_config(in_channels=2 * old.in_features, out_channels=old.in_features)


def lora_config(transformer: torch.nn.Module, settings: dict):
    """The LoRA: ``rank`` on the blocks' layers that ``lora_layers`` names, full rank on the
    widened embedder (as ai-toolkit trains it: the condition's columns are learnt whole)."""
    from peft import LoraConfig

    rank = settings.get("rank") or DEFAULT_RANK
    alpha = settings.get("alpha") or rank
    full = min(getattr(transformer, EMBEDDER).in_features, getattr(transformer, EMBEDDER).out_features)
    targets = [*lora_targets(transformer, (EMBEDDER,), settings.get("lora_layers") or "all"), EMBEDDER]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        rank_pattern={f"^{EMBEDDER}$": full},
        alpha_pattern={f"^{EMBEDDER}$": full * alpha / rank},
        lora_dropout=0.0,
        init_lora_weights=True,  # B at zero: the base's output at step 0
    )


def control_lora(transformer: torch.nn.Module, settings: dict) -> ControlLoRAModel:
    """``transformer`` (frozen) widened, with the LoRA; the trained part."""
    widen(transformer)
    transformer.add_adapter(lora_config(transformer, settings))
    for name, p in transformer.named_parameters():
        p.requires_grad_(".lora_" in name)
    return ControlLoRAModel(transformer)


def base_transformer(fam):
    """A fresh copy of the base's transformer (the sweep's and the evaluation's models)."""
    import diffusers

    from ..models.base_model import BaseRef

    ref = BaseRef.read()
    cls = getattr(diffusers, fam.transformer_class)
    return cls.from_pretrained(ref.name_or_path, subfolder="transformer", revision=ref.revision)


class ControlLoRA(Adapter):
    name = "control_lora"
    title = "Control-LoRA"
    families = ("flux",)
    settings = ("rank", "alpha", "lora_layers")
    classes = ()  # a LoRA file, no model class
    files = (LORA_FILE,)

    def make(self, fam, base, t, a):
        return control_lora(base.denoiser, a.model_dump())

    def new_layers(self, fam):
        return (f"trained.{EMBEDDER}",)  # the embedder's LoRA: the condition's way in

    def residuals(self, fam, module, noised, text, batch, control, device):
        """The transformer's prediction with the condition's packed latents after the image's."""
        from ..models.families.flux import pack, unpack

        dtype = compute_dtype(module.transformer)
        inputs = fam.transformer_inputs(module.transformer, noised, text, device, dtype)
        inputs["hidden_states"] = torch.cat([inputs["hidden_states"], pack(control.to(device))], dim=2)
        for k in ("hidden_states", "pooled_projections", "encoder_hidden_states"):  # the timestep stays fp32
            inputs[k] = inputs[k].to(dtype)
        return unpack(module(**inputs), *noised.noisy.shape[-2:])

    def predict(self, fam, denoiser, noised, text, batch, residuals, dtype, device):
        return residuals

    def pipeline_class(self, fam):
        return "FluxControlPipeline"

    def pipeline(self, fam, base, module, scheduler=None):
        import diffusers

        parts = {**fam.pipeline_parts(base, scheduler), "transformer": module.transformer}
        return diffusers.FluxControlPipeline(**parts)

    def call_arguments(self, kw: dict) -> dict:
        """FluxControlPipeline's names: the control's strength is the LoRA's scale. It has no true
        CFG, so its arguments (the negative prompt, its scale) are dropped: a base without a
        guidance embedding, as the tiny one, samples unguided there."""
        import inspect

        import diffusers

        takes = inspect.signature(diffusers.FluxControlPipeline.__call__).parameters
        kw = {k: v for k, v in kw.items() if k in takes or k == "controlnet_conditioning_scale"}
        if "controlnet_conditioning_scale" in kw:
            kw["joint_attention_kwargs"] = {"scale": kw.pop("controlnet_conditioning_scale")}
        return kw

    def save(self, module, folder, settings):
        """The LoRA as ``FluxControlPipeline.save_lora_weights`` writes it, its config beside."""
        from diffusers import FluxControlPipeline
        from peft.utils import get_peft_model_state_dict

        t = module.transformer
        config = t.peft_config["default"].to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        FluxControlPipeline.save_lora_weights(
            folder, transformer_lora_layers=get_peft_model_state_dict(t), transformer_lora_adapter_metadata=config
        )

    def load(self, folder, **kw):
        """The base's transformer with the LoRA loaded as a user loads it (``load_lora_weights``)."""
        import diffusers

        from ..models.families import family

        t = base_transformer(family("flux"))
        parts = dict.fromkeys(("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
        diffusers.FluxControlPipeline(transformer=t, **parts).load_lora_weights(folder)
        return ControlLoRAModel(t.requires_grad_(False))

    def from_state(self, final, state, settings, like=None):
        from ..models.families import family

        module = control_lora(base_transformer(family("flux")).requires_grad_(False), settings)
        module.load_state_dict(state)
        return module

    def card_lines(self, fam, base_id, model_id):
        return (
            "from diffusers import FluxControlPipeline\n"
            f'pipe = FluxControlPipeline.from_pretrained("{base_id}")\n'
            f'pipe.load_lora_weights("{model_id}")  # widens the transformer\'s input embedder as it loads'
        )
