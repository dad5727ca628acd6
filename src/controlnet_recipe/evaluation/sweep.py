"""The checkpoint sweep: every saved checkpoint's ControlNet, and the rule that picks one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..training.checkpoints import EMA_WEIGHTS, WEIGHTS, list_checkpoints, read_state


@dataclass
class Candidate:
    step: int
    path: Path  # a checkpoint folder, or the final model folder


def candidates(checkpoints: Path, final: Path, final_step: int) -> list[Candidate]:
    """Complete checkpoints up to ``final_step``, oldest first (DeepSpeed's too: training
    consolidates their shards into the same weights file), and the final model if no checkpoint
    has its step. A longer run's checkpoints past ``final_step`` (the same settings, so the same
    folder) are not this model's candidates."""
    found = [Candidate(read_state(p)["step"], p) for p in list_checkpoints(checkpoints) if (p / WEIGHTS).is_file()]
    found = [c for c in found if c.step <= final_step]
    if not any(c.step == final_step for c in found):
        found.append(Candidate(final_step, final))
    return found


def load_controlnet(c: Candidate, final: Path):
    """The candidate's trained module (a ControlNet, or the kind of control ``final`` holds), with
    the final model's config: its EMA weights where the run kept an EMA (as the final model
    holds), else its trained weights, as the kind saves them (a LoRA merged)."""
    from safetensors.torch import load_file

    from ..adapters import adapter_of, settings_of

    kind = adapter_of(final)
    if c.path == final:
        return kind.load(final)
    ema = c.path / EMA_WEIGHTS
    return kind.from_state(final, load_file(ema if ema.is_file() else c.path / WEIGHTS), settings_of(final)).eval()


def choose(rows: list[dict], fidelity: str, tolerance: float, max_forgetting: float) -> tuple[dict, str]:
    """The earliest checkpoint whose ``fidelity`` (higher is better) is within ``tolerance``
    (relative) of the best, among those whose ``forgetting`` is at most ``max_forgetting``; if none
    forgets that little, among all (and the reason says so)."""
    ok = [r for r in rows if r["forgetting"] <= max_forgetting]
    pool = ok or rows
    best = max(r[fidelity] for r in pool)
    bar = best - tolerance * abs(best)
    chosen = min((r for r in pool if r[fidelity] >= bar), key=lambda r: r["step"])
    why = f"earliest step with {fidelity} >= {bar:.4f} ({1 - tolerance:.0%} of the best, {best:.4f})" + (
        f" and forgetting <= {max_forgetting}" if ok else f"; no checkpoint had forgetting <= {max_forgetting}"
    )
    return chosen, why
