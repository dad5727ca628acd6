"""`python -m controlnet_recipe doctor`: the container's smoke check, here on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

from controlnet_recipe import cli
from controlnet_recipe.apps import doctor

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU report")


@no_gpu
def test_doctor_without_gpu_says_so_and_passes(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: doctor needs none
    assert cli.main(["doctor", "--bnb-lines", "2"]) == 0
    out = capsys.readouterr().out
    assert "no GPU" in out
    assert "python -m bitsandbytes: ok" in out
    assert "xformers" in out
    assert out.rstrip().endswith("doctor: ok (no GPU: CPU only)")


@no_gpu
def test_doctor_require_gpu_fails_without_one(capsys, monkeypatch):
    monkeypatch.setattr(doctor, "check_bitsandbytes", lambda r, tail: r.line("bitsandbytes", "skipped"))
    assert doctor.main(["--require-gpu"]) == 1
    assert "doctor: FAILED (1): gpu: no GPU and --require-gpu" in capsys.readouterr().out


def test_doctor_reports_an_unwritable_home(capsys, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("a file, not a folder")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = doctor.Report()
    doctor.check_user(r)
    assert r.failures == [f"HOME: {home} is not writable by uid {os.getuid()}"]
