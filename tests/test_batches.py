"""The training pairs: the cache's rows held in memory read exactly as the Arrow files do."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from controlnet_recipe.training.batches import CachedPairs, InMemoryRows


def _pairs(n: int = 12):
    rng = np.random.default_rng(0)
    cache = Dataset.from_dict(
        {
            "latent_mean": rng.normal(size=(n, 4, 2, 2)).astype("float32").tolist(),
            "text_embedding": rng.normal(size=(n, 3, 5)).astype("float16").tolist(),
        }
    ).with_format("torch")
    images = [PILImage.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
    conditions = Dataset.from_dict(
        {"cond": images, "i": list(range(n))}, features=Features({"cond": Image(), "i": Value("int32")})
    )
    return cache, conditions


def test_rows_in_memory_give_the_batches_the_arrow_files_give():
    cache, conditions = _pairs()
    in_memory = CachedPairs(cache, conditions, "cond", 8)
    from_files = CachedPairs(cache, conditions, "cond", 8, cache_bytes=0)
    assert isinstance(in_memory.cache, InMemoryRows) and not isinstance(from_files.cache, InMemoryRows)
    for idx in ([3, 0, 7], [11], list(range(12))):
        a, b = in_memory.__getitems__(idx), from_files.__getitems__(idx)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
