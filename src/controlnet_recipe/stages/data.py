"""data stage: produce the source images (with landmarks and attributes where known).

Sources are a small registry chosen by ``data.source``. ``synthetic`` is the embedded default:
rendered faces with ground-truth landmarks, deterministic from the seed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator

from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

from ..config import Config, DataCfg
from ..faces.synthetic import make_face
from ..storage import DATA_DIR, fresh_dir, write_json

FEATURES = Features(
    {
        "image": Image(),
        "landmarks": Sequence(Sequence(Sequence(Value("float32")))),  # faces x 68 x (x, y)
        "attributes": Value("string"),  # JSON of what the generator chose
    }
)
SPLIT_SEED_STRIDE = 10_000_000  # validation seeds never collide with training seeds


def _synthetic_rows(seeds: list[int], size: int) -> Iterator[dict]:
    for seed in seeds:
        img, lm, attrs = make_face(seed, size)
        yield {"image": img, "landmarks": [lm.tolist()], "attributes": json.dumps(attrs.to_dict())}


def synthetic(cfg: DataCfg, image_column: str, cache_dir: str) -> DatasetDict:
    """Synthetic faces: ``num_train`` + ``num_validation`` samples rendered at ``resolution``."""
    procs = max(1, min(os.cpu_count() or 1, 8))
    features = Features({image_column if k == "image" else k: v for k, v in FEATURES.items()})
    splits = {}
    for i, (split, n) in enumerate((("train", cfg.num_train), ("validation", cfg.num_validation))):
        seeds = [cfg.seed * 1000 + i * SPLIT_SEED_STRIDE + j for j in range(n)]
        # datasets splits list-valued gen_kwargs into one contiguous shard per process.
        splits[split] = Dataset.from_generator(
            _rows_renamed,
            gen_kwargs={"seeds": seeds, "size": cfg.resolution, "image_column": image_column},
            features=features,
            num_proc=min(procs, n) if n >= 64 else None,
            split=split,
            cache_dir=cache_dir,
        )
    return DatasetDict(splits)


def _rows_renamed(seeds: list[int], size: int, image_column: str) -> Iterator[dict]:
    for row in _synthetic_rows(seeds, size):
        row[image_column] = row.pop("image")
        yield row


SOURCES: dict[str, Callable[[DataCfg, str, str], DatasetDict]] = {"synthetic": synthetic}


def main(cfg: Config) -> None:
    r = cfg.recipe
    out = fresh_dir(DATA_DIR)
    with tempfile.TemporaryDirectory(dir=out.parent) as cache:
        ds = SOURCES[r.data.source](r.data, r.columns.image, cache)
        ds.save_to_disk(str(out))
    write_json(out / "report.json", {"source": r.data.source, **{s: len(d) for s, d in ds.items()}})
    print(f"data: {', '.join(f'{len(d)} {s}' for s, d in ds.items())} -> {out}")
