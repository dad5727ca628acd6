"""Training checkpoints that a kill can never leave half-written.

A checkpoint is written into a hidden ``.checkpoint-N.tmp`` folder, flushed to disk, and renamed
to ``checkpoint-N`` only when complete; ``latest`` only ever sees renamed folders, and leftovers
of an interrupted save are removed on the next start.

Each run keeps its checkpoints apart, in ``run-<key>/`` where the key digests the settings that
the steps already taken depend on (the data, the optimizer's kind, DeepSpeed, the levers, the
batch; the length of the run only where the learning-rate schedule depends on it). So settings
that leave those steps alone (a larger ``max_train_steps`` on a constant schedule, validation,
logging and checkpoint cadence) resume the same run, and any other change starts a new run
beside the earlier one, whose checkpoints nothing prunes or overwrites.

A checkpoint is read back before a run resumes from it (:func:`damage`): the sizes its state
recorded, safetensors headers, zip archives' checksums. A damaged one (a bad copy, a failing disk)
is renamed ``checkpoint-N.damaged``, kept for a person to look at, and the run resumes from the
newest good one before it; where none is good, the run stops with one line.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..core.errors import BadInput, MissingInput
from ..core.storage import begin_atomic, commit_atomic, read_json, staging, write_json

STATE = "training_state.json"  # written last: its presence marks a complete checkpoint
WEIGHTS = "model.safetensors"  # the ControlNet's weights: accelerate's save_state, or consolidated from ZeRO
EMA_WEIGHTS = "ema.safetensors"  # the EMA of the ControlNet (train.ema_decay set), keyed like the model
_NAME = re.compile(r"^checkpoint-(\d+)$")
RUN_PREFIX = "run-"


def run_dir(root: Path, key: str) -> Path:
    """Where the run with settings digest ``key`` keeps its checkpoints."""
    return root / f"{RUN_PREFIX}{key}"


def difference(saved: dict, current: dict, most: int = 3) -> str:
    """The settings that differ, as ``key: saved -> current`` (the first ``most`` of them)."""
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    shown = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys[:most]]
    return ", ".join(shown) + (f" and {len(keys) - most} more" if len(keys) > most else "") or "no recorded setting"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def clean_partial(root: Path) -> list[str]:
    """Remove what interrupted saves left behind; return their names."""
    if not root.is_dir():
        return []
    gone = []
    for p in root.iterdir():
        if p.name.startswith(".checkpoint-") or (_NAME.match(p.name) and not (p / STATE).is_file()):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def _files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (but the state) and its size in bytes."""
    files = [f for f in sorted(folder.rglob("*")) if f.is_file() and f.name != STATE]
    return {f.relative_to(folder).as_posix(): f.stat().st_size for f in files}


def _unreadable(f: Path) -> str | None:
    """Why ``f`` cannot be read back, from its format (None where it can, or the format is unknown)."""
    try:
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            size = f.stat().st_size
            return None if size == end else f"{size} bytes where its header needs {end}"
        if f.suffix == ".json":
            json.loads(f.read_text())
        else:
            with open(f, "rb") as fh:
                zipped = fh.read(4) == b"PK\x03\x04"  # torch.save's format: optimizer, scheduler, RNG states
            if zipped:
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
                return None if bad is None else f"{bad} fails its checksum"
    except (OSError, ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile, UnicodeDecodeError) as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def damage(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (``file: reason``), or None when it reads back whole."""
    try:
        recorded = read_json(checkpoint / STATE).get("files", {})
    except (OSError, ValueError) as e:
        return f"{STATE}: {type(e).__name__}: {e}"
    for name, size in recorded.items():
        f = checkpoint / name
        if not f.is_file():
            return f"{name}: missing"
        if f.stat().st_size != size:
            return f"{name}: {f.stat().st_size} bytes, {size} when saved"
    for f in sorted(checkpoint.rglob("*")):
        if f.is_file() and (why := _unreadable(f)):
            return f"{f.relative_to(checkpoint).as_posix()}: {why}"
    return None


def _free(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``... : the first name not taken."""
    n, free = 0, path
    while free.exists():
        n += 1
        free = path.with_name(f"{path.name}.{n}")
    return free


def _alone() -> None:
    """The barrier of a single process."""


def save_checkpoint(
    root: Path,
    step: int,
    write: Callable[[Path], None],
    state: dict,
    keep: int | None,
    *,
    main: bool = True,
    barrier: Callable[[], None] = _alone,
) -> Path:
    """``write(folder)`` saves the model, optimizer, scheduler and RNG states; ``state`` (the step,
    the data position, the run's key and settings) goes in last. Keeps the newest ``keep`` checkpoints.

    Every process calls this (``main`` on one of them, ``barrier`` waiting for all): each writes
    its own part (its RNG state; DeepSpeed's optimizer shards) into the one hidden folder, which
    the main process then completes and renames."""
    final = root / f"checkpoint-{step}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        begin_atomic(final)  # .checkpoint-N.tmp until complete
    barrier()
    tmp = staging(final)
    write(tmp)
    barrier()
    if main:
        write_json(tmp / STATE, {"step": step, **state, "files": _files(tmp)})
        commit_atomic(tmp, final, fsync=True)
        if keep:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old)
    barrier()
    return final


def consolidate_zero(folder: Path) -> None:
    """DeepSpeed's ZeRO shards in ``folder`` -> one fp32 ``model.safetensors`` keyed like the
    model (DeepSpeed's own conversion, zero_to_fp32), so that the sweep and the export read every
    tier's checkpoints alike."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS))


def _other_runs(root: Path, mine: Path) -> list[Path]:
    """Other runs' newest checkpoints (the flat layout of earlier versions counts as one run), newest first."""
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(RUN_PREFIX) and p != mine] + [root]
    newest = [found[-1] for f in folders if (found := list_checkpoints(f))]
    return sorted(newest, key=lambda p: (p / STATE).stat().st_mtime, reverse=True)


def checkpoint_step(checkpoint: Path) -> int:
    """N of a ``checkpoint-N`` folder."""
    return int(_NAME.match(checkpoint.name).group(1))


def find_resume(root: Path, resume: str | None, key: str, settings: dict, last: int | None = None) -> tuple[Path | None, str]:
    """The checkpoint to resume from (or None) and why, for the log. ``resume`` is ``latest`` (this
    run's newest checkpoint at or before step ``last``), a checkpoint folder (which must belong to
    this run), or None (start fresh). ``key`` and ``settings``: this run's (see the module's
    docstring). A shorter run of the same settings (a constant schedule: the same key) resumes
    from a checkpoint within its length, never from one a longer run saved past it."""
    mine = run_dir(root, key)
    if resume is None:
        return None, "resume_from_checkpoint is null: starting fresh"
    if resume == "latest":
        found = list_checkpoints(mine)
        past = [c for c in found if last is not None and checkpoint_step(c) > last]
        found = [c for c in found if c not in past]
        note = f" ({', '.join(c.name for c in past)}: past this run's {last} steps, kept)" if past else ""
        damaged = []
        for checkpoint in reversed(found):
            if (why := damage(checkpoint)) is None:
                return checkpoint, "".join(damaged) + f"resuming from {checkpoint}{note}"
            damaged.append(f"{checkpoint}/{why}: cannot be read; ")
        if found:
            raise BadInput(f"train: no checkpoint of this run can be read ({''.join(damaged).rstrip('; ')}); nothing was deleted")
        others = _other_runs(root, mine)
        if past:
            return None, f"no checkpoint of this run within its {last} steps: starting fresh{note}"
        if not others:
            return None, f"no checkpoint in {root}: starting fresh"
        saved = read_json(others[0] / STATE).get("settings", {})
        return None, (
            f"{others[0]} is another run's ({difference(saved, settings)}): starting a new run in {mine}; "
            "its checkpoints are kept"
        )
    path = Path(resume)
    if not (path / STATE).is_file():
        raise MissingInput(f"train.resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE})")
    if why := damage(path):
        raise BadInput(f"train.resume_from_checkpoint: {path}/{why}: cannot be read")
    state = read_json(path / STATE)
    if last is not None and state.get("step", 0) > last:
        raise BadInput(f"train.resume_from_checkpoint: {path} is at step {state['step']}, past this run's {last} steps")
    if state.get("run") != key:
        raise BadInput(
            f"train.resume_from_checkpoint: {path} belongs to a run with other settings "
            f"({difference(state.get('settings', {}), settings)})"
        )
    return path, f"resuming from {path}"


def read_state(checkpoint: Path) -> dict:
    return read_json(checkpoint / STATE)


def run_key(settings: dict) -> str:
    """A run's identity: the digest of what the steps it took depend on."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpointer:
    """This run's checkpoints: where they go (``run-<key>`` under ``root``), when (every ``every``
    steps and at the last), how many stay (``keep``), and which one a run resumes from. Every
    process calls :meth:`save`; ``main`` and ``barrier`` say which one completes it."""

    def __init__(self, root: Path, settings: dict, every: int, keep: int | None, *, main: bool = True, barrier=_alone):
        self.root, self.settings, self.every, self.keep = root, settings, every, keep
        self.main, self.barrier = main, barrier
        self.key = run_key(settings)
        self.dir = run_dir(root, self.key)

    def resume_point(self, resume: str | None, last: int | None = None) -> tuple[Path | None, str]:
        """What to resume from (see :func:`find_resume`), after removing this run's interrupted saves."""
        if self.main:
            for name in clean_partial(self.dir):
                print(f"train: removed {name}, left by an interrupted save")
        path, why = find_resume(self.root, resume, self.key, self.settings, last)
        if self.main and resume == "latest" and path is not None:  # latest walked past these: damaged, kept aside
            found = [c for c in list_checkpoints(self.dir) if last is None or checkpoint_step(c) <= last]
            for later in found[found.index(path) + 1 :]:
                later.rename(_free(later.with_name(later.name + ".damaged")))
        return path, why

    def clear(self, last: int) -> None:
        """A fresh start: this run's checkpoints go, but those a longer run saved past ``last``."""
        for c in list_checkpoints(self.dir):
            if checkpoint_step(c) <= last:
                shutil.rmtree(c)
        for leftover in self.dir.glob("*.damaged") if self.dir.is_dir() else []:
            shutil.rmtree(leftover)

    def should_save(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == last

    def save(self, step: int, write: Callable[[Path], None], state: dict) -> Path:
        return save_checkpoint(
            self.dir,
            step,
            write,
            {"run": self.key, "settings": self.settings, **state},
            self.keep,
            main=self.main,
            barrier=self.barrier,
        )
