"""What the training loop reads: cached latents and text embeddings with their conditioning images,
in an order fixed by the seed, that can start at any position (exact resume).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from ..core.buckets import parse as parse_bucket
from ..core.errors import BadInput
from ..core.images import images_to_tensor
from ..models.families import CONTROL

CONDITIONS_IN_MEMORY_BYTES = 2 * 1024**3  # decoded conditioning images (uint8) kept in memory up to this
CACHE_IN_MEMORY_BYTES = 4 * 1024**3  # the latent cache's rows kept in memory as tensors up to this


class CachedPairs(torch.utils.data.Dataset):
    """Row i of the latent cache with the conditioning image of row i of the captions dataset.

    The conditioning images are decoded once into a uint8 tensor when they fit in
    ``memory_bytes`` (the embedded default's 4000 at 64 px take 49 MB); otherwise each batch
    decodes its PNGs, as upstream's data loader does every step. The cache's rows are read into
    tensors once when they fit in ``cache_bytes`` (the embedded default's: 66 MB), the same values
    as reading them from the Arrow files per batch, which took 15 ms of its 300 ms step."""

    def __init__(
        self,
        cache_rows,
        conditions,
        column: str,
        resolution: int | tuple[int, int],
        shuffle_seed: int | None = None,
        memory_bytes: int = CONDITIONS_IN_MEMORY_BYTES,
        cache_bytes: int = CACHE_IN_MEMORY_BYTES,
    ):
        if len(cache_rows) != len(conditions):
            raise BadInput(f"latent cache has {len(cache_rows)} rows, the dataset {len(conditions)}; run the cache stage again")
        self.cache, self.conditions, self.column, self.resolution = cache_rows, conditions, column, resolution
        # The planted failure (train.shuffle_conditions): row i gets the condition of another row.
        self.condition_row = None if shuffle_seed is None else derangement(len(conditions), shuffle_seed)
        if cache_rows.data.nbytes <= cache_bytes:
            self.cache = InMemoryRows(cache_rows[:])
        self.decoded = None
        w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
        if len(conditions) * 3 * w * h <= memory_bytes:
            self.decoded = torch.cat(
                [self._decode(list(range(i, min(i + 256, len(conditions))))) for i in range(0, len(conditions), 256)]
            )

    def _decode(self, idx: list[int]) -> torch.Tensor:
        """(N, 3, H, W) uint8: exactly the values that [0, 1] conditioning x 255 gives back."""
        cond = images_to_tensor(self.conditions[idx][self.column], self.resolution, normalize=False)
        return (cond * 255).round().to(torch.uint8)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        rows = self.cache[idx]
        cond_idx = idx if self.condition_row is None else self.condition_row[idx].tolist()
        cond = (self.decoded[cond_idx] if self.decoded is not None else self._decode(cond_idx)).float() / 255
        if self.condition_row is not None and f"{CONTROL}_mean" in rows:  # the condition's latents go with it
            rows.update({k: v for k, v in self.cache[cond_idx].items() if k.startswith(CONTROL)})
        # latent_mean, latent_std, text_embedding (and SDXL's pooled_embedding, time_ids; SD3's and
        # Flux's pooled_embedding, control_mean, control_std)
        return {**{k: v.float() for k, v in rows.items()}, "conditioning": cond}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


class BucketedPairs(torch.utils.data.Dataset):
    """The pairs of every aspect bucket, one :class:`CachedPairs` each, indexed as one dataset:
    bucket after bucket (``offsets``). A micro-batch (:class:`BucketBatches`) stays in one bucket."""

    def __init__(self, parts: list[CachedPairs]):
        self.parts = parts
        self.sizes = [len(p) for p in parts]
        self.offsets = [sum(self.sizes[:k]) for k in range(len(parts))]

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        k = bisect_right(self.offsets, idx[0]) - 1
        local = [i - self.offsets[k] for i in idx]
        if min(local) < 0 or max(local) >= self.sizes[k]:
            raise IndexError(f"a micro-batch across aspect buckets: {idx}")
        return self.parts[k].__getitems__(local)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def training_pairs(cache, conditions, column: str, resolution: int, shuffle_seed: int | None = None):
    """What the loop trains on: :class:`CachedPairs` (square), or with aspect buckets (the cache's
    ``buckets``) a :class:`BucketedPairs` of one part per bucket, each with its conditions at its size."""
    if cache.buckets is None:
        return CachedPairs(cache.rows, conditions, column, resolution, shuffle_seed)
    total = len(conditions)
    parts = [
        CachedPairs(
            cache.rows[b],
            conditions.select(rows),
            column,
            parse_bucket(b),
            shuffle_seed,
            memory_bytes=CONDITIONS_IN_MEMORY_BYTES * len(rows) // total,
            cache_bytes=CACHE_IN_MEMORY_BYTES * len(rows) // total,
        )
        for b, rows in cache.buckets.items()
    ]
    return BucketedPairs(parts)


class InMemoryRows:
    """A dataset's columns as tensors, indexed as the dataset is (``rows[[i, j]]``: a dict)."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.columns.items()}


def derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation with no fixed point (a random cyclic shift of a random order)."""
    if n < 2:
        raise BadInput(f"cannot pair {n} sample(s) with another sample's condition")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    shift = int(torch.randint(1, n, (1,), generator=g))
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(shift)
    return out


class ResumableBatches(Sampler[list[int]]):
    """Micro-batches of indices for one process: a fresh permutation of the data every epoch
    (seeded by ``seed`` and the epoch), each global micro-batch split across the processes, the
    last incomplete one dropped. ``start`` skips that many global micro-batches, so a resumed run
    reads exactly what the interrupted one would have read next."""

    def __init__(self, n: int, micro: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.micro, self.seed, self.start, self.rank, self.world = n, micro, seed, start, rank, world
        self.per_epoch = n // (micro * world)
        if self.per_epoch == 0:
            raise BadInput(f"dataset of {n} samples is smaller than one global micro-batch ({micro} x {world})")

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of ``epoch``, in order."""
        perm = self.permutation(epoch)
        starts = ((j * self.world + self.rank) * self.micro for j in range(self.per_epoch))
        return [perm[lo : lo + self.micro].tolist() for lo in starts]

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        while True:
            epoch, pos = divmod(k, self.per_epoch)
            yield from self.epoch_batches(epoch)[pos:]
            k = (epoch + 1) * self.per_epoch


class BucketBatches(ResumableBatches):
    """:class:`ResumableBatches` for aspect buckets: every epoch each bucket's samples in a fresh
    permutation, cut into global micro-batches (the last one filled from the bucket's own start,
    so that a bucket smaller than a batch still trains), the batches of all buckets in a seeded
    order. No micro-batch mixes sizes; ``start`` resumes exactly as there."""

    def __init__(self, sizes: list[int], micro: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.sizes, self.micro, self.seed, self.start, self.rank, self.world = sizes, micro, seed, start, rank, world
        self.n = sum(sizes)
        self.chunks = [-(-n // (micro * world)) for n in sizes]
        self.per_epoch = sum(self.chunks)
        if self.per_epoch == 0:
            raise BadInput("no samples in any aspect bucket")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's share of ``epoch``'s global micro-batches (``micro * world`` indices each), in order."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        glob, batches, offset = self.micro * self.world, [], 0
        for n, chunks in zip(self.sizes, self.chunks):
            perm = torch.randperm(n, generator=g) + offset
            batches += list(perm.repeat(-(-chunks * glob // n))[: chunks * glob].view(chunks, glob))
            offset += n
        mine = slice(self.rank * self.micro, (self.rank + 1) * self.micro)
        return [batches[i][mine].tolist() for i in torch.randperm(len(batches), generator=g).tolist()]


def batches_for(data, micro: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> ResumableBatches:
    """The sampler of ``data``'s micro-batches: by aspect bucket for a :class:`BucketedPairs`."""
    if isinstance(data, BucketedPairs):
        return BucketBatches(data.sizes, micro, seed, start, rank, world)
    return ResumableBatches(len(data), micro, seed, start, rank, world)


def _already_collated(batch: dict) -> dict:
    return batch


def batch_stream(dataset: CachedPairs, sampler: ResumableBatches, workers: int) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of micro-batches (the sampler never ends; the loop counts steps)."""
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_already_collated,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The random stream of one micro-batch (noise, timesteps, latent samples, caption dropout),
    a function of its position alone: a resumed run draws the same numbers."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 101 + rank)
