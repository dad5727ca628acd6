"""ControlNet-LoRA (as SimpleTuner trains it): the family's ControlNet, its copied weights frozen
with LoRA (peft) on their attention, feed-forward and convolution layers, its new layers (the
condition's embedder and the zero convolutions) trained whole. It is saved merged, as a plain
ControlNet of the family's class, so the family's stock ControlNet pipeline loads it unchanged."""

from __future__ import annotations

import torch

from .controlnet import ControlNet

DEFAULT_RANK = 16
# the copied layers that get a LoRA: attention projections, feed-forward, the resnets' convolutions
# (UNet families) and the transformer blocks' linears (SD3, Flux), by the last part of their name
TARGETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    "all": (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
        "conv1",
        "conv2",
        "conv_shortcut",
    ),
}
LORA = ".lora_A.default.weight"


def lora_targets(model: torch.nn.Module, new_layers: tuple[str, ...], which: str) -> list[str]:
    """The full names of the copied Linear and Conv2d layers that ``which`` names."""
    ends = TARGETS[which]
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
        and not name.startswith(new_layers)
        and any(name == e or name.endswith("." + e) for e in ends)
    ]


def merged_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A LoRA-wrapped model's state as the plain model's: each wrapped layer's weight plus
    ``scale`` x B @ A, its keys without peft's ``base_layer``/``lora_`` parts."""
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        layer, param = key.split(".base_layer.")
        if param == "weight" and layer + LORA in state:
            a, b = state[layer + LORA].float(), state[layer + ".lora_B.default.weight"].float()
            delta = (b.flatten(1) @ a.flatten(1)).view(value.shape) * scale
            value = (value.float() + delta).to(value.dtype)
        out[f"{layer}.{param}"] = value
    return out


class ControlNetLoRA(ControlNet):
    name = "controlnet_lora"
    title = "ControlNet-LoRA"
    settings = ("rank", "alpha", "lora_layers")

    def make(self, fam, base, t, a):
        from peft import LoraConfig, inject_adapter_in_model

        model = fam.make_controlnet(base, t)
        model.requires_grad_(False)
        targets = lora_targets(model, fam.new_layers, a.lora_layers or "all")
        rank = a.rank or DEFAULT_RANK
        config = LoraConfig(r=rank, lora_alpha=a.alpha or rank, target_modules=targets, lora_dropout=0.0)
        model = inject_adapter_in_model(config, model)  # the LoRA's B starts at zero: the copy as it was
        for name, p in model.named_parameters():  # the new layers train whole, the LoRA's factors
            p.requires_grad_(name.startswith(fam.new_layers) or ".lora_" in name)
        return model

    @staticmethod
    def scale(settings: dict) -> float:
        rank = settings["rank"] or DEFAULT_RANK
        return (settings["alpha"] or rank) / rank

    def save(self, module, folder, settings: dict) -> None:
        """Merged: a plain ControlNet of the family's class (a plain one passes through as it is)."""
        self.from_state(folder, module.state_dict(), settings, like=module).save_pretrained(folder)

    def from_state(self, final, state: dict, settings: dict, like=None):
        return super().from_state(final, merged_state(state, self.scale(settings)), settings, like)
