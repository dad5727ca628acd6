"""Shared I/O: stage folders, datasets on disk, JSON reports, images <-> tensors, seeding."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import codedeps
from .errors import MissingInput

# Every stage's output folder, relative to the project root. dvc.yaml names the same paths.
DATA_DIR = Path("data/source")
PHOTOREAL_DIR = Path("data/photoreal")
CONDITIONS_DIR = Path("data/conditions")
CAPTIONS_DIR = Path("data/captions")
CACHE_DIR = Path("data/cache")
BASE_DIR = Path("models/base")
EVALUATOR_DIR = Path("models/evaluator")
ADAPTER_DIR = Path("models/adapter")  # the last step of training
BEST_DIR = Path("models/best")  # the checkpoint the evaluate stage chose (what generate, the web demo and publish use)
TRAIN_DIR = Path("train")  # checkpoints/ and live/ (DVCLive) survive reruns, for resuming
EVAL_DIR = Path("eval")


def fresh_dir(path: Path) -> Path:
    """Empty ``path`` (a stage owns its output folder) and return it."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging(final: Path) -> Path:
    """The hidden sibling ``.<name>.tmp`` that ``final`` is written into."""
    return final.with_name(f".{final.name}.tmp")


def begin_atomic(final: Path) -> Path:
    """``final``'s staging folder, emptied and created."""
    tmp = staging(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_atomic(tmp: Path, final: Path, *, fsync: bool = False) -> None:
    """Rename the finished ``tmp`` to ``final`` (replacing an older one); ``fsync`` flushes it first."""
    if fsync:
        _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextmanager
def atomic_dir(final: Path, *, fsync: bool = False) -> Iterator[Path]:
    """The one way a folder is written (shards, cache shards, checkpoints): whole or not at all.
    The block writes into ``begin_atomic``'s hidden sibling, which ``commit_atomic`` renames to
    ``final`` only when the block ends without error. (Several processes writing one folder, as
    DeepSpeed's ranks do, call the two halves themselves around a barrier.)"""
    tmp = begin_atomic(final)
    yield tmp
    commit_atomic(tmp, final, fsync=fsync)


def write_json(path: Path, obj: Any) -> None:
    """Write atomically, so a crash never leaves half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


SPLITS_FILE = "splits.json"  # written last: lists each split's shards; its presence marks a finished stage
RUN_FILE = ".run.json"


def resolve_dataset_dir(path: Path) -> Path:
    """A stage folder may hold only ``passthrough.json``, naming the folder it passes on unchanged."""
    p = path / "passthrough.json"
    return Path(read_json(p)["dataset"]) if p.is_file() else path


def load_dataset_dir(path: Path):
    """A stage's dataset: a ``DatasetDict`` of its splits, each the concatenation of its shards
    (memory-mapped Arrow, nothing copied), with a clear error if the stage has not finished."""
    from datasets import DatasetDict, concatenate_datasets, disable_caching, load_from_disk

    # map() would otherwise write cache files into the *input* stage's folder, which DVC owns.
    disable_caching()
    path = resolve_dataset_dir(path)
    if not (path / SPLITS_FILE).is_file():
        raise MissingInput(f"{path}: no dataset here; run the stage that writes it first (dvc repro)")
    splits = read_json(path / SPLITS_FILE)  # a split with no sample at all is left out
    return DatasetDict(
        {
            split: concatenate_datasets([load_from_disk(str(path / split / s)) for s in shards])
            for split, shards in splits.items()
            if shards
        }
    )


STATS_FILE = "stage_stats.json"  # beside a shard's data: what the stage counted while making it


class ShardedOutput:
    """A stage's output written shard by shard: ``<root>/<split>/shard-NNNNN`` (each a saved
    Dataset, renamed into place when complete), then ``splits.json``. A rerun with the same ``key``
    (a digest of the stage's inputs and params) and the same code keeps finished shards: an
    interrupted stage resumes where it stopped; anything else starts afresh."""

    def __init__(self, root: Path, key: str, stage: str):
        self.root = root
        key = digest(key, codedeps.stage_code_digest(stage))  # the stage's own files: dvc.yaml's code deps
        run = root / RUN_FILE
        if not (run.is_file() and read_json(run).get("key") == key):
            fresh_dir(root)
            write_json(run, {"key": key})
        (root / SPLITS_FILE).unlink(missing_ok=True)
        self.shards: dict[str, set[str]] = {}

    def done(self, split: str, index: int) -> bool:
        """True if the shard is finished (by an earlier run too); finished shards are recorded."""
        path = shard_path(self.root, split, index)
        if (path / "state.json").is_file():
            self.shards.setdefault(split, set()).add(path.name)
            return True
        return False

    def write(self, split: str, index: int, ds, stats: dict | None = None) -> None:
        """Save a finished shard (an empty one is not saved: it is cheap to find empty again) with
        its ``stats`` (what the stage counted making it), so a resumed run reports them too."""
        self.shards.setdefault(split, set())
        if len(ds):
            write_shard(self.root, split, index, ds, stats)
            self.shards[split].add(shard_path(self.root, split, index).name)

    def stats(self, split: str, index: int) -> dict:
        """The ``stats`` a finished shard was written with ({} if none)."""
        f = shard_path(self.root, split, index) / STATS_FILE
        return read_json(f) if f.is_file() else {}

    def finish(self) -> None:
        """Write splits.json: the stage is complete. Every split is listed, even when empty."""
        write_json(self.root / SPLITS_FILE, {split: sorted(names) for split, names in self.shards.items()})


def shard_path(root: Path, split: str, index: int) -> Path:
    return root / split / f"shard-{index:05d}"


def write_shard(root: Path, split: str, index: int, ds, stats: dict | None = None) -> None:
    """Save one shard (and its stats): into a temporary folder, renamed into place when complete."""
    with atomic_dir(shard_path(root, split, index)) as tmp:
        ds.save_to_disk(str(tmp))
        if stats:
            write_json(tmp / STATS_FILE, stats)


def digest(*parts: Any) -> str:
    """A short stable digest of JSON-able parts (params, upstream fingerprints)."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_key(path: Path) -> str:
    """What a downstream stage's resume key depends on: the upstream stage's shard list and run key."""
    path = resolve_dataset_dir(path)
    return digest(read_json(path / SPLITS_FILE), read_json(path / RUN_FILE) if (path / RUN_FILE).is_file() else None)


def each_gpu(worker, todo: list, cfg, gpus: bool, what: str) -> int:
    """Run ``worker(rank, world, todo, cfg)``: in this process, or (``gpus`` and several GPUs) in one
    process per GPU, each taking every world-th item of ``todo``. Returns the number of processes."""
    import multiprocessing as mp

    import torch

    world = torch.cuda.device_count() if gpus and torch.cuda.device_count() > 1 else 1
    if world > 1:
        # spawn, not fork: CUDA cannot be initialised in a forked process.
        procs = [mp.get_context("spawn").Process(target=worker, args=(k, world, todo, cfg)) for k in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode:
                raise RuntimeError(f"{what}: a worker process failed (exit code {p.exitcode}); rerun to resume")
    elif todo:
        worker(0, 1, todo, cfg)
    return world


def num_workers(requested: int | None = None) -> int:
    return requested or max(1, os.cpu_count() or 1)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
