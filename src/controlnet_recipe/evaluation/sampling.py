"""Image generation with fixed, recorded settings: the same prompts, conditions and seeds for the
ControlNet and for the base alone, so every statistic can be paired by (condition, seed)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline
from tqdm.auto import tqdm

from ..config import EvaluateCfg
from ..models.base_model import BaseComponents, pipeline_components

BATCH = 16


class Sampler:
    def __init__(self, base: BaseComponents, e: EvaluateCfg, resolution: int):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        for m in (base.unet, base.vae, base.text_encoder):
            m.to(self.device, self.dtype)
        self.components = pipeline_components(base)
        self.e, self.resolution = e, resolution
        self.base_pipe = StableDiffusionPipeline(**self.components)
        self.base_pipe.set_progress_bar_config(disable=True)

    def settings(self) -> dict:
        e = self.e
        return {
            "scheduler": type(self.components["scheduler"]).__name__,
            "num_inference_steps": e.num_inference_steps,
            "guidance_scale": e.guidance_scale,
            "conditioning_scale": e.conditioning_scale,
            "resolution": self.resolution,
            "dtype": str(self.dtype).replace("torch.", ""),
            "seed": e.seed,
        }

    @torch.no_grad()
    def generate(
        self, prompts: list[str], seeds: list[int], controlnet=None, conditions: list | None = None, desc: str = ""
    ) -> list:
        """One image per prompt; image i always comes from ``seeds[i]`` whatever the batching.
        With a ``controlnet``, ``conditions`` steer it; without, the base alone."""
        if controlnet is not None:
            pipe = StableDiffusionControlNetPipeline(controlnet=controlnet.to(self.device, self.dtype), **self.components)
            pipe.set_progress_bar_config(disable=True)
        else:
            pipe = self.base_pipe
        images = []
        for i in tqdm(range(0, len(prompts), BATCH), desc=f"evaluate: {desc}", leave=False):
            kw = dict(
                prompt=prompts[i : i + BATCH],
                num_inference_steps=self.e.num_inference_steps,
                guidance_scale=self.e.guidance_scale,
                generator=[torch.Generator().manual_seed(s) for s in seeds[i : i + BATCH]],
                height=self.resolution,
                width=self.resolution,
            )
            if controlnet is not None:
                kw.update(image=conditions[i : i + BATCH], controlnet_conditioning_scale=self.e.conditioning_scale)
            images += pipe(**kw).images
        return images
