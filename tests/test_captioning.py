"""BlipCaptioner on a tiny BLIP built and saved locally (no hub download)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from controlnet_recipe.models.captioner import BlipCaptioner

from .conftest import PROMPT


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    return [rgb, rgb.convert("L"), Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA")]


def test_captions_images_of_any_mode_in_batches(tiny_blip):
    cap = BlipCaptioner(str(tiny_blip), device="cpu", batch_size=2, max_new_tokens=5)
    assert cap.model.dtype == torch.float32 and not cap.model.training
    out = cap.caption(_images())
    assert len(out) == 3 and all(isinstance(c, str) and c == c.strip() for c in out)
    assert all("[" not in c for c in out)  # special tokens skipped
    assert cap.caption([]) == []
    # batching does not change results (greedy decoding)
    assert BlipCaptioner(str(tiny_blip), device="cpu", batch_size=1, max_new_tokens=5).caption(_images()) == out


def test_conditional_caption_drops_the_prompt(tiny_blip):
    cap = BlipCaptioner(str(tiny_blip), device="cpu", batch_size=2, max_new_tokens=5, prompt=PROMPT)
    images = _images()
    out = cap.caption(images)
    assert len(out) == 3
    # The same generation done by hand keeps the prompt in front; the captioner removes exactly that.
    inputs = cap.processor(images=[im.convert("RGB") for im in images[:1]], text=[PROMPT], return_tensors="pt")
    with torch.inference_mode():
        ids = cap.model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=1)
    full = cap.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert full.startswith(PROMPT)
    assert out[0] == full[len(PROMPT) :].strip()
