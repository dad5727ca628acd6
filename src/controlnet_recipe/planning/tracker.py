"""Live-memory tracking over a real forward and backward, without a GPU.

The step runs under ``FakeTensorMode`` (tensors with shapes, dtypes and storages, no data and no
arithmetic) and under :class:`LiveMemory`, a dispatch mode that sees every tensor each operator
creates, the backward's included. Each new storage counts, rounded up as CUDA's caching allocator
rounds it, from its creation until Python frees it; the peak of that sum is the step's peak
allocated memory. torchtitan's estimator works the same way (``torch.distributed._tools``'s
``MemTracker``); that one tracks per module and refuses modules called twice, which diffusers'
blocks are, so this one tracks storages alone and sorts them into named groups.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROUND = 512  # bytes: the CUDA caching allocator's smallest block (c10/cuda/CUDACachingAllocator.cpp)

# Fused attention kernels whose backward allocates working memory of its own (flash-attention 2's
# fp32 dQ accumulator and softmax sums). The CPU kernels that stand in for them under fake tensors
# save the same tensors (output and log-sum-exp) as the CUDA ones.
ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


def rounded(nbytes: int) -> int:
    return -(-nbytes // ROUND) * ROUND


class LiveMemory(TorchDispatchMode):
    """Bytes held by live storages, in groups: ``register(tensor, group)`` for what exists before
    the step (weights, inputs), ``regroup`` for what an operator made that turns out to be a
    gradient or an optimizer state; everything else an operator creates is ``activations``."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: dict[str, int] = defaultdict(int)
        self._where: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> [group, bytes]
        self._refs: list = []
        self.current = 0
        self.peak = 0
        self.peak_groups: dict[str, int] = {}
        self.attention_workspace = 0  # the largest fused-attention backward's own buffers

    def _add(self, st: torch.UntypedStorage, group: str) -> None:
        if st in self._where:
            return
        n = rounded(st.nbytes())
        entry = [group, n]
        self._where[st] = entry
        self._refs.append(weakref.finalize(st, self._free, entry))
        self.groups[group] += n
        self.current += n
        if self.current > self.peak:
            self.peak = self.current
            self.peak_groups = dict(self.groups)

    def _free(self, entry: list) -> None:
        self.groups[entry[0]] -= entry[1]
        self.current -= entry[1]

    def register(self, tensor: torch.Tensor | None, group: str) -> None:
        if tensor is not None:
            self._add(tensor.untyped_storage(), group)

    def regroup(self, tensor: torch.Tensor | None, group: str) -> None:
        """Move ``tensor``'s storage (already counted, or not yet) into ``group``."""
        if tensor is None:
            return
        st = tensor.untyped_storage()
        entry = self._where.get(st)
        if entry is None:
            self._add(st, group)
        elif entry[0] != group:
            self.groups[entry[0]] -= entry[1]
            self.groups[group] += entry[1]
            entry[0] = group

    def reset_peak(self) -> None:
        self.peak, self.peak_groups = self.current, dict(self.groups)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in ATTENTION_OPS:
            q = args[0]
            b, h, lq, d = q.shape
            # dQ accumulated in fp32, plus the per-row softmax sums, while the backward runs
            self.attention_workspace = max(self.attention_workspace, rounded(b * h * lq * d * 4) + rounded(b * h * lq * 4))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t.untyped_storage(), "activations")
        return out
