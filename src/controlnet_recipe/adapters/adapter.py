"""What a kind of control supplies (:class:`Adapter`): the families it runs on, the settings it
reads, the module it trains from the frozen base, how that module joins the base's forward in the
training step and in sampling, how it is saved and loaded, and the stock diffusers pipeline that
runs it. The trainer, the sampling code, the sweep and the model card ask the run's adapter and
never name one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..core.config import ConfigError

if TYPE_CHECKING:
    import torch

    from ..core.config import AdapterCfg, TrainCfg
    from ..models.families import BaseComponents, Family
    from ..objectives.diffusion import Noised

SETTINGS = (
    "num_res_blocks",
    "rank",
    "alpha",
    "lora_layers",
    "size_ratio",
)  # AdapterCfg's settings besides kind: each kind reads some


class Adapter:
    """The base class: a kind overrides what differs. Subclasses are stateless singletons."""

    name: str  # params' adapter.kind
    title: str  # for people (logs, the model card)
    families: tuple[str, ...]  # the families it trains on
    settings: tuple[str, ...] = ()  # the adapter settings it reads; the others must be null
    classes: tuple[str, ...]  # the diffusers classes it saves as (config.json's _class_name)
    files: tuple[str, ...] = ("config.json", "diffusion_pytorch_model.safetensors")  # what its saved folder holds
    pipeline_argument = "controlnet"  # the pipeline's constructor argument for the trained module
    scale_argument = "controlnet_conditioning_scale"  # the pipeline's call argument for the control's strength
    tiny_layers_per_block = 1  # the tiny base's UNet this kind needs (resnets per block; the demo's: 1)
    copies_blocks = False  # whether it trains from a copy of the base's blocks (train.controlnet_layers counts them)

    def check(self, family: str, a: AdapterCfg, where: str = "adapter") -> None:
        """A pair this kind does not run on, or a setting it does not read, stops here in one line,
        before any model loads."""
        if family not in self.families:
            raise ConfigError(f"{where}.kind: {self.name} does not run on family {family}; it runs on {', '.join(self.families)}")
        for key in SETTINGS:
            if getattr(a, key) is not None and key not in self.settings:
                reads = ", ".join(self.settings) or "none"
                raise ConfigError(f"{where}.{key}: {self.name} has no {key} (it reads {reads}); expected null")

    # --- training ---
    def make(self, fam: Family, base: BaseComponents, t: TrainCfg, a: AdapterCfg) -> torch.nn.Module:
        """The trainable module, built from (or beside) the frozen base."""
        raise NotImplementedError

    def new_layers(self, fam: Family) -> tuple[str, ...]:
        """Its layers that train at ``new_layers_lr_multiplier`` x the learning rate (parameter-name prefixes)."""
        return ()

    def residuals(self, fam: Family, module, noised: Noised, text: dict, batch: dict, control: torch.Tensor, device):
        """What the trained module computes from the condition (under the step's autocast)."""
        raise NotImplementedError

    def predict(self, fam: Family, denoiser, noised: Noised, text: dict, batch: dict, residuals, dtype, device):
        """The frozen denoiser's output with ``residuals`` joined into its forward."""
        raise NotImplementedError

    # --- sampling ---
    def pipeline_class(self, fam: Family) -> str:
        raise NotImplementedError

    def pipeline(self, fam: Family, base: BaseComponents, module, scheduler=None):
        """The stock diffusers pipeline of the base's components with ``module``."""
        import diffusers

        parts = fam.pipeline_parts(base, scheduler)
        return getattr(diffusers, self.pipeline_class(fam))(**{self.pipeline_argument: module}, **parts)

    def call_arguments(self, kw: dict) -> dict:
        """The family's sampling arguments as this kind's pipeline names them."""
        if "controlnet_conditioning_scale" in kw and self.scale_argument != "controlnet_conditioning_scale":
            kw = {**kw}
            kw[self.scale_argument] = kw.pop("controlnet_conditioning_scale")
        return kw

    # --- saving ---
    def save(self, module, folder: Path, settings: dict) -> None:
        """``module`` as its stock pipeline loads it (``settings``: the run's adapter params)."""
        module.save_pretrained(folder)

    def load(self, folder: Path, **kw):
        """A saved module as its own class (``from_pretrained``)."""
        from ..models.base_model import trained_class_of

        return trained_class_of(folder).from_pretrained(folder, **kw)

    def from_state(self, final: Path, state: dict, settings: dict, like=None):
        """A checkpoint's weights (``state``, as training saved them) as the saved module in
        ``final`` is: its class and config (or ``like``'s, a module of that class), for the sweep."""
        from ..models.base_model import trained_class_of

        if like is not None:
            model = type(like).from_config(like.config)
        else:
            cls = trained_class_of(final)
            model = cls.from_config(cls.load_config(final))
        model.load_state_dict(state)
        return model

    # --- the model card ---
    def saved_class(self, fam: Family) -> str:
        """The diffusers class of what this kind saves for ``fam``."""
        return self.classes[0]

    def card_lines(self, fam: Family, base_id: str, model_id: str) -> str:
        """The Python lines that load the result in its stock pipeline, for the model card."""
        cls, pipe, arg = self.saved_class(fam), self.pipeline_class(fam), self.pipeline_argument
        return (
            f"from diffusers import {cls}, {pipe}\n"
            f'{arg} = {cls}.from_pretrained("{model_id}")\n'
            f'pipe = {pipe}.from_pretrained("{base_id}", {arg}={arg})'
        )
