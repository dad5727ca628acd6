"""Expected failures end in one line on stderr and exit code 2; unexpected ones keep their traceback."""

from __future__ import annotations

import pytest
from PIL import Image

from controlnet_recipe import cli
from controlnet_recipe.apps import doctor
from controlnet_recipe.stages import data
from tests.conftest import tiny_params


@pytest.fixture
def project_dir(in_tmp, params_file):
    params_file(tiny_params())
    return in_tmp


def one_line_error(capsys, *args: str) -> str:
    assert cli.main(list(args)) == 2
    err = capsys.readouterr().err  # libraries may warn first (transformers does, on import)
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and err.rstrip().endswith(ours[0]) and "Traceback" not in err, err
    return ours[0]


@pytest.mark.parametrize(
    ("stage", "names"),
    [
        ("conditions", "data/photoreal"),
        ("captions", "data/conditions"),
        ("base", "data/captions"),
        ("evaluator", "data/captions"),
        ("cache", "models/base"),  # first: the base names the family, which the adapter must run on
        ("train", "models/base"),  # first: the base names the family, and so the tiers
        ("evaluate", "data/captions"),
    ],
)
def test_a_stage_before_its_inputs_says_which_input_in_one_line(project_dir, capsys, stage, names):
    assert names in one_line_error(capsys, stage)


def test_missing_model_is_one_line(project_dir, capsys):
    Image.new("RGB", (64, 64)).save("condition.png")
    assert "make demo" in one_line_error(capsys, "generate", "--condition", "condition.png", "--prompt", "a face")


def test_missing_params_file_is_one_line(in_tmp, capsys):
    assert "nowhere.yaml" in one_line_error(capsys, "--params", "nowhere.yaml", "check")


def test_any_command_after_params(project_dir, capsys, monkeypatch):
    monkeypatch.setattr(doctor, "check_bitsandbytes", lambda r, tail: r.line("bitsandbytes", "skipped"))
    assert cli.main(["--params", "params.yaml", "doctor"]) == 0
    assert "doctor: ok" in capsys.readouterr().out
    assert cli.main(["--params", "params.yaml", "check"]) == 0


def test_an_unexpected_failure_keeps_its_traceback(project_dir, monkeypatch):
    def broken(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(data, "main", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["data"])
