# The recipe's image. BASE is a build argument: a CUDA runtime base for rented GPUs (torch wheels
# carry their own CUDA libraries, so a slim `-base` image is enough), or a plain Debian/Python base
# for CPU runs. Not yet built in CI (issue: "Ship it"); see README.
ARG BASE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    WANDB_MODE=offline \
    HOME=/home/recipe \
    HF_HOME=/home/recipe/.cache/huggingface \
    PYTHONPATH=/work/src
ENV PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git make ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/recipe
COPY requirements.lock pyproject.toml README.md ./
COPY src ./src
RUN python3 -m venv /opt/venv \
 && pip install --no-cache-dir -r requirements.lock \
 && pip install --no-cache-dir --no-deps --no-build-isolation .

RUN useradd --create-home --home-dir /home/recipe --uid 1000 recipe \
 && mkdir -p /home/recipe/.cache/huggingface /work \
 && chown -R recipe:recipe /home/recipe /work \
 && git config --system --add safe.directory '*'
USER recipe
WORKDIR /work
VOLUME ["/home/recipe/.cache/huggingface", "/work"]
# The repository is mounted at /work; its src/ comes first on PYTHONPATH, so the stages DVC hashes
# are the stages that run. docker run --gpus all --ipc=host -v "$PWD":/work IMAGE dvc repro
CMD ["dvc", "repro"]
