"""What a stage prints off a terminal: progress as whole lines, not redraws; third-party messages
that nobody can act on dropped by their exact text, and their neighbours kept."""

from __future__ import annotations

import logging
import warnings

from controlnet_recipe.core import logs


def test_progress_off_a_terminal_writes_whole_lines(capsys, monkeypatch):
    monkeypatch.setattr(logs, "PROGRESS_SECONDS", 0)
    for _ in logs.progress(range(5), desc="stage: work"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines and all(line.startswith("stage: work:") for line in lines)
    assert "100%" in lines[-1] and "5/5" in lines[-1]


def test_progress_off_a_terminal_is_occasional(capsys):
    bar = logs.progress(range(10_000), desc="stage: fast")  # the defaults: a line every 30 s
    for _ in bar:
        bar.set_postfix(loss="0.1", refresh=False)
    assert capsys.readouterr().err == ""  # shorter than one interval: no line


def test_third_party_noise_is_dropped_and_real_warnings_kept(caplog):
    logs.quiet_libraries()
    logs.quiet_libraries()  # twice: one filter per message
    assert sum(isinstance(f, logs._DropText) for f in logging.getLogger("diffusers.models.modeling_utils").filters) == 1
    noisy = logging.getLogger("diffusers.models.modeling_utils")
    with caplog.at_level(logging.WARNING):
        noisy.warning(
            "There are modules in UNet2DConditionModel that should be kept in float32: []. Casting directly with `to()`"
        )
        noisy.warning("There are modules in T5 that should be kept in float32: ['wo']. Casting directly with `to()`")
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
        )
    ds = logging.getLogger("DeepSpeed")  # its own handler, not propagated: its filter is asked directly
    record = ds.makeRecord("DeepSpeed", logging.WARNING, "x", 1, "Setting accelerator to CPU. If you have GPU or ...", (), None)
    assert not ds.filter(record)  # this machine has no GPU: the notice says nothing to act on
    kept = [r.getMessage() for r in caplog.records]
    assert kept == ["There are modules in T5 that should be kept in float32: ['wo']. Casting directly with `to()`"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        logs.quiet_libraries()  # after simplefilter: its ignores come first
        warnings.warn("Metric `Kernel Inception Distance` will save all extracted features in buffer.", UserWarning, stacklevel=1)
        warnings.warn("Metric `Kernel Inception Distance` is something else.", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["Metric `Kernel Inception Distance` is something else."]
