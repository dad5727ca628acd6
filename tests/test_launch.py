"""Which runs go through `accelerate launch`, and with what command."""

from __future__ import annotations

import pytest

from controlnet_recipe.core.config import ConfigError, load_config
from controlnet_recipe.training.launch import launch_command

from .conftest import ROOT

TIERS = load_config(ROOT / "params.yaml").tiers


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_one_gpu_runs_in_process():
    assert launch_command(TIERS["24gb"], 1, ["train"], {}) is None
    assert launch_command(TIERS["cpu"], 0, ["train"], {}) is None


def test_several_gpus_one_process_each():
    cmd = launch_command(TIERS["24gb"], 4, ["train", "--params", "p.yaml"], {})
    assert _flag(cmd, "--num_processes") == "4" and _flag(cmd, "--mixed_precision") == "fp16"
    assert _flag(cmd, "--config_file").endswith("multi_gpu.yaml")
    assert cmd[-5:] == ["-m", "controlnet_recipe", "train", "--params", "p.yaml"]


def test_deepspeed_tier_always_launched():
    cmd = launch_command(TIERS["8gb-zero2"], 1, ["train"], {})
    assert _flag(cmd, "--config_file").endswith("deepspeed_zero2.yaml")
    assert _flag(cmd, "--deepspeed_config_file").endswith("zero2.json")


def test_multi_node():
    env = {"NUM_MACHINES": "2", "MACHINE_RANK": "1", "MAIN_PROCESS_IP": "10.0.0.1"}
    cmd = launch_command(TIERS["80gb"], 8, ["train"], env)
    assert _flag(cmd, "--num_processes") == "16" and _flag(cmd, "--num_machines") == "2"
    assert _flag(cmd, "--machine_rank") == "1" and _flag(cmd, "--main_process_ip") == "10.0.0.1"
    with pytest.raises(ConfigError, match="MAIN_PROCESS_IP"):
        launch_command(TIERS["80gb"], 8, ["train"], {"NUM_MACHINES": "2"})
