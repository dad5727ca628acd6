"""Check a machine or a container before a long run: ``python -m controlnet_recipe doctor [--require-gpu]``.

Prints who runs (uid, HOME, HF_HOME, the working folder: writable, git can read it), what torch sees
(version, CUDA build, GPUs, the tier ``gpu: auto`` picks), runs bitsandbytes' own self-check
(``python -m bitsandbytes``) and tries xformers (imported; on a GPU, one attention call against
PyTorch's). Without a GPU it says ``no GPU`` and still exits 0, unless ``--require-gpu`` is given.
Exits 1 when a check fails, with one ``doctor: FAILED`` line naming each failure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def line(self, name: str, text: str) -> None:
        print(f"{name:<13} {text}", flush=True)

    def fail(self, name: str, text: str) -> None:
        self.line(name, f"FAILED: {text}")
        self.failures.append(f"{name}: {text}")


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            return True
    except OSError:
        return False


def check_user(r: Report) -> None:
    uid, gid = os.getuid(), os.getgid()
    try:
        import pwd

        name = pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        name = "(no passwd entry)"
    r.line("user", f"{name} (uid {uid}, gid {gid})" + ("  -- root" if uid == 0 else ""))
    home = Path(os.environ.get("HOME", "~")).expanduser()
    hf_home = Path(os.environ.get("HF_HOME", home / ".cache" / "huggingface"))
    for label, path in (("HOME", home), ("HF_HOME", hf_home)):
        if _writable(path):
            r.line(label, f"{path} writable")
        else:
            r.fail(label, f"{path} is not writable by uid {uid}")


def check_workdir(r: Report) -> None:
    cwd = Path.cwd()
    if not (cwd / "dvc.yaml").is_file():
        r.line("repository", f"{cwd}: no dvc.yaml here (not the recipe's repository; skipped)")
        return
    if not _writable(cwd):
        owner = cwd.stat().st_uid
        r.fail("repository", f"{cwd} (owner uid {owner}) is not writable by uid {os.getuid()}: run as its owner (--user)")
        return
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True)
    if git.returncode == 0:
        r.line("repository", f"{cwd} writable, git HEAD {git.stdout.strip()}")
    elif "dubious ownership" in git.stderr:
        r.fail("repository", f"git refuses {cwd} (dubious ownership): git config --global --add safe.directory {cwd}")
    else:
        why = (git.stderr.strip().splitlines() or ["git failed"])[-1]
        r.line("repository", f"{cwd} writable, not a git checkout ({why})")


def check_torch(r: Report) -> bool:
    import torch

    r.line("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    if not torch.cuda.is_available():
        r.line("gpu", "no GPU: torch sees no CUDA device; training runs on the CPU (tier cpu)")
        return False
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        r.line("gpu", f"cuda:{i} {p.name}, {p.total_memory / 1024**3:.1f} GiB, compute capability {p.major}.{p.minor}")
    try:
        x = torch.randn(256, 256, device="cuda")
        torch.testing.assert_close((x @ x).cpu(), x.cpu() @ x.cpu(), rtol=1e-2, atol=1e-2)
        free = torch.cuda.mem_get_info(0)[0] / 1024**3
        r.line(
            "gpu",
            f"a matmul on cuda:0 agrees with the CPU; {free:.1f} GiB free, which gpu: auto fits the run to "
            "(python -m controlnet_recipe plan shows each tier's prediction)",
        )
    except Exception as e:  # a broken driver/runtime pairing shows up here
        r.fail("gpu", f"a matmul on cuda:0 failed: {e}")
    return True


def check_bitsandbytes(r: Report, tail: int) -> None:
    p = subprocess.run([sys.executable, "-m", "bitsandbytes"], capture_output=True, text=True, timeout=600)
    lines = (p.stdout + p.stderr).strip().splitlines()
    for line in lines if p.returncode else lines[len(lines) - max(tail, 0) :]:
        print(f"  | {line}")
    if p.returncode == 0:
        r.line("bitsandbytes", "python -m bitsandbytes: ok")
    else:
        r.fail("bitsandbytes", f"python -m bitsandbytes exited {p.returncode}")


def check_xformers(r: Report, gpu: bool) -> None:
    try:
        import xformers
        import xformers.ops
    except ImportError as e:
        r.line("xformers", f"not installed ({e.msg}); attention uses PyTorch SDPA (the GPU image installs it)")
        return
    if not gpu:
        r.line("xformers", f"{xformers.__version__} imported; not exercised (no GPU)")
        return
    import torch

    try:
        q, k, v = (torch.randn(2, 64, 4, 32, device="cuda", dtype=torch.float16) for _ in range(3))
        out = xformers.ops.memory_efficient_attention(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        r.line("xformers", f"{xformers.__version__}: memory_efficient_attention on cuda:0 agrees with SDPA")
    except Exception as e:
        r.fail("xformers", f"{xformers.__version__}: memory_efficient_attention failed: {e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="controlnet-recipe doctor", description=__doc__)
    p.add_argument("--require-gpu", action="store_true", help="fail when torch sees no GPU")
    p.add_argument("--bnb-lines", type=int, default=12, help="lines of bitsandbytes' self-check to show")
    args = p.parse_args(argv)
    r = Report()
    r.line("python", f"{sys.version.split()[0]} ({sys.executable})")
    check_user(r)
    check_workdir(r)
    gpu = check_torch(r)
    if args.require_gpu and not gpu:
        r.fail("gpu", "no GPU and --require-gpu (docker: --gpus all; is the NVIDIA container toolkit installed?)")
    check_bitsandbytes(r, args.bnb_lines)
    check_xformers(r, gpu)
    if r.failures:
        print(f"doctor: FAILED ({len(r.failures)}): " + "; ".join(r.failures), flush=True)
        return 1
    print("doctor: ok" + ("" if gpu else " (no GPU: CPU only)"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
