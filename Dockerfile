# The recipe's image: the pinned environment in /opt/venv, a non-root user, the repository mounted at
# /work (its src/ comes first on PYTHONPATH, so the stages DVC hashes are the stages that run).
#
#   docker build -t controlnet-recipe .                        # GPU image (CUDA torch, xformers)
#   docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" \
#     -v "$PWD":/work -v ~/.cache/huggingface:/home/recipe/.cache/huggingface \
#     controlnet-recipe python -m controlnet_recipe doctor --require-gpu
#
# BASE: torch==2.13.0 from PyPI is a CUDA 13.0 build that carries its own CUDA libraries (the
# cuda-toolkit wheels), so a slim CUDA *base* image is enough; its NVIDIA_REQUIRE_CUDA makes the
# NVIDIA runtime refuse to start on a driver too old for CUDA 13 instead of failing inside torch.
# Any Debian/Ubuntu image with python3 works as well (CI builds on a local Debian bookworm).
# GPU_EXTRAS=1 adds docker/requirements-gpu.txt (xformers, torch's CUDA wheels pinned); 0 for CPU.
# TORCH_WHEELS: a folder of local wheels mounted into the build (CI: the CPU torch wheel), looked at
# beside PyPI; 2.13.0+cpu sorts above PyPI's 2.13.0, so the lock's torch==2.13.0 takes it, as on the host.
ARG BASE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${BASE}

ARG GPU_EXTRAS=1
ARG TORCH_WHEELS=
ARG DEBIAN_FRONTEND=noninteractive

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DVC_NO_ANALYTICS=1 \
    WANDB_MODE=offline \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HOME=/home/recipe \
    USER=recipe \
    HF_HOME=/home/recipe/.cache/huggingface \
    PYTHONPATH=/work/src \
    VENV=/opt/venv \
    VENV_READY=1
# VENV and VENV_READY: the Makefile's targets (make train, make repro, make test) use /opt/venv as
# it is and never try to create or update an environment.
ENV PATH=/opt/venv/bin:$PATH

# Distribution packages float with the base image (Ubuntu and Debian versions differ); every Python
# package is pinned below. g++ and python3-dev: PyTorch compiles C++ extensions on first use, among
# them DeepSpeed's shared-memory op wherever DeepSpeed runs on the CPU (the 8gb-zero2 tier's test),
# and torch.compile's kernels (tiers with compile: true).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ git make ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/recipe
COPY requirements.lock docker/requirements-gpu.txt ./
RUN python3 -m venv /opt/venv \
 && gpu="" && if [ "$GPU_EXTRAS" = 1 ]; then gpu=requirements-gpu.txt; fi \
 && PIP_FIND_LINKS="$TORCH_WHEELS" pip install --requirement requirements.lock ${gpu:+--requirement "$gpu"}
# DeepSpeed (the 8gb-zero2 tier) after the lock, as `make env` installs it: a source build that
# imports the torch installed above (no build isolation, which would fetch another torch), its
# dependencies pinned in that file or the lock (--no-deps), no CUDA ops compiled (DS_BUILD_OPS=0).
COPY requirements-deepspeed.txt ./
RUN DS_BUILD_OPS=0 pip install --no-deps --no-build-isolation --requirement requirements-deepspeed.txt \
 && touch /opt/venv/.installed

# The package itself (for use without a mounted repository; with one, /work/src wins).
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps . && rm -rf build src/*.egg-info

# uid 1000 (Ubuntu images already have an `ubuntu` user there). HOME and HF_HOME are writable by any
# uid, so `--user "$(id -u):$(id -g)"` works for a repository owned by someone else than 1000;
# safe.directory lets git, and DVC through pygit2, read a repository mounted from another owner.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --create-home --home-dir /home/recipe --uid 1000 --user-group --shell /bin/bash recipe \
 && mkdir -p /home/recipe/.cache/huggingface /work \
 && chown -R 1000:1000 /home/recipe /work \
 && chmod 1777 /home/recipe /home/recipe/.cache /home/recipe/.cache/huggingface \
 && git config --system --add safe.directory '*'
USER 1000:1000
WORKDIR /work
VOLUME ["/home/recipe/.cache/huggingface", "/work"]
CMD ["dvc", "repro"]
