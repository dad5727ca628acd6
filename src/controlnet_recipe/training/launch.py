"""Multi-GPU and multi-node runs: the train stage re-executes itself under ``accelerate launch``
when more than one GPU (or machine) takes part, or when the tier uses DeepSpeed.

One process per visible GPU; several machines are named with the environment variables
``NUM_MACHINES``, ``MACHINE_RANK``, ``MAIN_PROCESS_IP`` and ``MAIN_PROCESS_PORT``, the same on
every machine except the rank. The launch config is chosen by the tier: DDP, or DeepSpeed ZeRO-2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..core.config import ConfigError, Tier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def launched() -> bool:
    """True inside a process started by accelerate/torchrun."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_DISABLE_RELAUNCH" in os.environ


def launch_command(tier: Tier, gpus: int, argv: list[str], env: dict[str, str]) -> list[str] | None:
    """The ``accelerate launch`` command for this machine, or None when one plain process will do."""
    machines = int(env.get("NUM_MACHINES", "1"))
    if gpus * machines <= 1 and not tier.deepspeed:
        return None
    name = "deepspeed_zero2" if tier.deepspeed else "multi_gpu"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "accelerate" / f"{name}.yaml")]
    cmd += ["--num_processes", str(max(gpus, 1) * machines), "--num_machines", str(machines)]
    cmd += ["--mixed_precision", tier.mixed_precision]
    if tier.deepspeed:
        cmd += ["--deepspeed_config_file", str(CONFIGS / "deepspeed" / f"{tier.deepspeed}.json")]
    if machines > 1:
        if not env.get("MAIN_PROCESS_IP"):
            raise ConfigError("MAIN_PROCESS_IP: expected the main machine's address when NUM_MACHINES > 1")
        cmd += ["--machine_rank", env.get("MACHINE_RANK", "0"), "--main_process_ip", env["MAIN_PROCESS_IP"]]
        cmd += ["--main_process_port", env.get("MAIN_PROCESS_PORT", "29500")]
    return [*cmd, "-m", "controlnet_recipe", *argv]


def relaunch(tier: Tier, argv: list[str]) -> bool:
    """Run the stage under accelerate if this machine needs it; True if it did (and succeeded)."""
    import torch

    if launched():
        return False
    cmd = launch_command(tier, torch.cuda.device_count(), argv, dict(os.environ))
    if cmd is None:
        return False
    print("train:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "ACCELERATE_DISABLE_RELAUNCH": "1"})
    return True
