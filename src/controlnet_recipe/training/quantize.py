"""The frozen base quantised (``base.quantize``): its weights stored in fewer bytes, computed in the
run's dtype, so that a large base fits a small card; what trains stays as it was.

- ``fp8``: diffusers' layerwise casting (the tiers' ``frozen_fp8``): every supported layer's weights
  in float8_e4m3fn, upcast for its forward.
- ``int8``, ``nf4``: bitsandbytes' ``Linear8bitLt`` (LLM.int8() without outliers) and ``Linear4bit``
  (NF4, double-quantised statistics, as QLoRA), on the frozen ``Linear`` layers; convolutions stay.
  bitsandbytes quantises a layer when it moves to its device, on a GPU and, since 0.45, on the CPU.

fp8 casts the layers diffusers' layerwise casting chooses (not the norms, the positional and patch
embeddings); int8 and nf4 every frozen ``Linear``, as diffusers' bitsandbytes quantiser does
(``measured.frozen_linears``), never a layer with a trained parameter (a LoRA's factors stay). The
planner counts each scheme with the same choice (``measured.quantize_linears``).
"""

from __future__ import annotations

import torch

from ..models.families.measured import frozen_linears

SCHEMES = ("none", "fp8", "int8", "nf4")


def quantized_linear(linear: torch.nn.Linear, scheme: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """``linear``'s bitsandbytes counterpart holding its weights (quantised when it moves to a device)."""
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if scheme == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if bias:
        q.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return q


def quantize_frozen(model: torch.nn.Module, scheme: str, compute_dtype: torch.dtype, device) -> int:
    """Quantise ``model``'s frozen layers by ``scheme`` on ``device``; returns how many layers."""
    if scheme == "none":
        return 0
    if scheme == "fp8":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
        return sum(1 for m in model.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d))
    names = frozen_linears(model)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, quantized_linear(getattr(owner, leaf), scheme, compute_dtype).to(device))
    return len(names)


def tier_with(tier, scheme: str):
    """``tier`` as it applies under the base's ``scheme``: a quantised base takes the place of the
    tier's fp8 storage (``frozen_fp8``), never both."""
    return tier if scheme == "none" else tier.model_copy(update={"frozen_fp8": False})
