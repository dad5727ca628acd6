"""Image generation with fixed, recorded settings: the same prompts, conditions and seeds for the
ControlNet and for the base alone, so every statistic can be paired by (condition, seed)."""

from __future__ import annotations

import torch

from ..core.config import EvaluateCfg
from ..core.logs import progress
from ..models.base_model import BaseComponents, inference_device, make_pipeline, sampling_kwargs, seeded

BATCH = 16


class Sampler:
    def __init__(self, base: BaseComponents, e: EvaluateCfg, resolution: int, adapter=None):
        """``adapter``: the kind of control the models to sample are (None: ControlNets)."""
        self.device, self.dtype = inference_device()
        self.base, self.e, self.resolution, self.adapter = base, e, resolution, adapter
        self.base_pipe = make_pipeline(base, device=self.device, dtype=self.dtype)

    def settings(self) -> dict:
        e = self.e
        return {
            "scheduler": type(self.base_pipe.scheduler).__name__,
            "num_inference_steps": e.num_inference_steps,
            "guidance_scale": e.guidance_scale,
            "conditioning_scale": e.conditioning_scale,
            "resolution": self.resolution,
            "dtype": str(self.dtype).replace("torch.", ""),
            "seed": e.seed,
        }

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        controlnet=None,
        conditions: list | None = None,
        desc: str = "",
        sizes: list[tuple[int, int]] | None = None,
    ) -> list:
        """One image per prompt; image i always comes from ``seeds[i]`` whatever the batching.
        With a ``controlnet``, ``conditions`` steer it; without, the base alone. ``sizes``: each
        image's (width, height) (aspect buckets; default: square at the resolution), batched by size."""
        pipe = (
            self.base_pipe
            if controlnet is None
            else make_pipeline(self.base, controlnet, self.adapter, device=self.device, dtype=self.dtype)
        )
        sizes = sizes or [(self.resolution, self.resolution)] * len(prompts)
        batches = []
        for size in dict.fromkeys(sizes):
            idx = [i for i, s in enumerate(sizes) if s == size]
            batches += [(size, idx[j : j + BATCH]) for j in range(0, len(idx), BATCH)]
        images: list = [None] * len(prompts)
        for (w, h), chunk in progress(batches, desc=f"evaluate: {desc}", leave=False):
            made = pipe(
                prompt=[prompts[i] for i in chunk],
                num_inference_steps=self.e.num_inference_steps,
                generator=seeded([seeds[i] for i in chunk]),
                height=h,
                width=w,
                **sampling_kwargs(
                    self.base,
                    len(chunk),
                    self.e.guidance_scale,
                    None if controlnet is None else [conditions[i] for i in chunk],
                    self.e.conditioning_scale,
                    self.adapter,
                ),
            ).images
            for i, im in zip(chunk, made):
                images[i] = im
        return images
