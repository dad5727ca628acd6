"""What a stage prints: its progress and its summary lines, and nothing from a library that the
user cannot act on.

On a terminal, progress bars redraw in place. Sent to a file or a pipe (CI, ``make demo > log``),
a bar writes a whole line every :data:`PROGRESS_SECONDS` instead, and its last state once it has
written one (a shorter bar writes nothing: the stage's summary line follows it), and the
libraries' own bars (datasets' "Saving the dataset", transformers' "Loading weights") are off.
A handful of third-party messages are silenced narrowly, each at its source, by its exact text:
never a whole logger or a warning category.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings

PROGRESS_SECONDS = 30  # off a terminal: a progress line at most this often


def on_terminal() -> bool:
    return sys.stderr.isatty()


class _Lines(io.TextIOBase):
    """A stream that turns tqdm's carriage-return redraws into whole lines (blank ones dropped)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, **kwargs):
    """tqdm, redrawn on a terminal; elsewhere an occasional line (the module's docstring)."""
    if on_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)
    from tqdm import tqdm

    kwargs.setdefault("mininterval", PROGRESS_SECONDS)
    kwargs.setdefault("delay", kwargs["mininterval"])  # no line at the start
    # the clock read at every update (not every n-th, which tqdm's monitor thread then redraws late, with a stale count)
    kwargs.setdefault("miniters", 1)
    kwargs.setdefault("maxinterval", 4 * kwargs["mininterval"])
    return tqdm(iterable, file=_Lines(sys.stderr), ascii=True, ncols=100, **kwargs)


class _DropText(logging.Filter):
    """Drops the records whose message contains ``text`` (while ``when()`` holds)."""

    def __init__(self, text: str, when=lambda: True):
        super().__init__()
        self.text, self.when = text, when

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.text in record.getMessage() and self.when())


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


# logger -> (text, when): third-party messages that tell the user nothing to act on
DROPPED = {
    # diffusers warns on every ``.to(dtype)`` of a model, also when no module is to be kept in fp32 (the list is empty)
    "diffusers.models.modeling_utils": ("that should be kept in float32: []. Casting directly", lambda: True),
    # transformers uses the PIL image processors when torchvision is absent: the ones the recipe wants
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to", lambda: True),
    # DeepSpeed (imported by accelerate) announces the CPU on a machine without a GPU; with one, it is a real problem
    "DeepSpeed": ("Setting accelerator to CPU. If you have GPU", _no_gpu),
}
IGNORED_WARNINGS = (
    # torchmetrics: KID keeps its features in memory; the evaluation's sample counts are small
    ("Metric `Kernel Inception Distance` will save all extracted features", UserWarning),
    # diffusers' own FluxControlNetModel imports FluxPosEmbed from its old place
    ("`FluxPosEmbed` is deprecated", FutureWarning),
)


def quiet_libraries() -> None:
    """Silence :data:`DROPPED` and :data:`IGNORED_WARNINGS`; off a terminal, the libraries' own
    progress bars too (set before those libraries are imported; an explicit setting wins)."""
    if not on_terminal():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow it
    for name, (text, when) in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text, when))
    for text, category in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=text, category=category)
