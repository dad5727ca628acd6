# The recipe's front door. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
GPU ?=
RECIPE ?=
ADAPTER ?=
# make generate / make web: the input, the prompt, a trained folder, any kind (default: models/best, else models/adapter)
PHOTO ?=
CONDITION ?=
PROMPT ?=
MODEL ?=
HOST ?= 127.0.0.1
PORT ?= 7860
INSTALLER ?= uv
UV_VERSION := 0.13.9
# Stages run with the project's environment first on PATH; DVC's analytics stay off (no network).
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export WANDB_MODE ?= offline
export HF_HUB_DISABLE_TELEMETRY := 1

.DEFAULT_GOAL := help
.PHONY: help env demo repro train generate web test test-slow lint format check lock clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'
	@echo "  variables: RECIPE=demo|depth|demo-sd3|demo-flux|faces|sdxl|sd3|flux, ADAPTER=controlnet|controlnet_lora|t2i_adapter|controlnet_xs, GPU=auto|cpu|8gb|...|80gb|sdxl-24gb|...|flux-24gb|flux-40gb|flux-80gb (make train), VENV=$(VENV), PYTHON=$(PYTHON)"

# VENV_READY=1 (the Docker image sets it, with VENV=/opt/venv): the environment was made at build time.
# uv (pinned, from PyPI) installs the same pinned lock as pip would, several times faster; it looks
# in pip's find-links folder too (PIP_FIND_LINKS: where this kind of machine keeps its CPU torch).
# --compile-bytecode writes the .pyc files at install, as pip does: without them every stage's
# process compiles torch/diffusers/transformers from source again (about 6 s each on 2 cores, and
# always where PYTHONDONTWRITEBYTECODE is set). INSTALLER=pip installs with pip instead.
# requirements-deepspeed.txt (DeepSpeed, a source build) comes after the lock, for its own reasons.
$(VENV)/.installed: $(if $(VENV_READY),,requirements.lock requirements-deepspeed.txt pyproject.toml)
	$(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),pip)
	$(BIN)/pip install --quiet -r requirements.lock
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-deps --no-build-isolation -r requirements-deepspeed.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
else
	$(BIN)/pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode -r requirements.lock $(addprefix --find-links ,$(PIP_FIND_LINKS))
	DS_BUILD_OPS=0 $(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode --no-deps --no-build-isolation -r requirements-deepspeed.txt
	$(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps --no-build-isolation -e .
endif
	@touch $@

env: $(VENV)/.installed ## create the virtualenv with the pinned versions (CPU torch here)

check: env ## validate params.yaml (one-line errors, nothing is built)
	$(BIN)/python -m controlnet_recipe check

# RECIPE=name: checked, then written into params.yaml (what dvc repro runs)
SET_RECIPE = @if [ -n "$(RECIPE)" ]; then \
	  $(BIN)/python -m controlnet_recipe check --recipe "$(RECIPE)" && \
	  sed -i -E 's/^recipe:[[:space:]]*[^[:space:]\#]+/recipe: $(RECIPE)/' params.yaml && echo "params.yaml: recipe: $(RECIPE)"; \
	fi
# ADAPTER=kind: checked against the recipe's family, then written into its block's adapter line
SET_ADAPTER = @if [ -n "$(ADAPTER)" ]; then $(BIN)/python -m controlnet_recipe check --adapter "$(ADAPTER)"; fi

demo: env ## run the whole pipeline on the embedded default (CPU, offline, under 10 min): make demo [RECIPE=depth] [ADAPTER=t2i_adapter]
	$(SET_RECIPE)
	$(SET_ADAPTER)
	$(BIN)/python -m controlnet_recipe check
	$(BIN)/dvc repro
	@echo
	@echo "Results:  eval/report.html (open it), eval/metrics.json (dvc metrics show), eval/grid.png,"
	@echo "          eval/sweep.png + train/plots (dvc plots show), the chosen model in models/best/"
	@$(BIN)/dvc metrics show

repro: env ## rerun only the stages whose code, params or inputs changed
	$(BIN)/dvc repro

train: env ## train the ControlNet (and what it needs): make train [RECIPE=faces] [GPU=16gb]
	$(SET_RECIPE)
	$(SET_ADAPTER)
	@if [ -n "$(GPU)" ]; then \
	  $(BIN)/python -m controlnet_recipe check --gpu "$(GPU)" && \
	  sed -i -E 's/^gpu:[[:space:]]*[^[:space:]#]+/gpu: $(GPU)/' params.yaml && echo "params.yaml: gpu: $(GPU)"; \
	fi
	$(BIN)/dvc repro train

generate: env ## generate faces: make generate PHOTO=face.jpg PROMPT="..." (or CONDITION=map.png) [MODEL=dir]
	@if [ -z "$(PROMPT)" ] || [ -z "$(PHOTO)$(CONDITION)" ]; then \
	  echo 'usage: make generate PHOTO=face.jpg PROMPT="a photo of a smiling woman"  (or CONDITION=map.png instead of PHOTO)' >&2; exit 2; \
	fi
	$(BIN)/python -m controlnet_recipe generate $(if $(PHOTO),--photo "$(PHOTO)") $(if $(CONDITION),--condition "$(CONDITION)") \
	  --prompt "$(PROMPT)" $(if $(MODEL),--model "$(MODEL)")

web: env ## the web demo on http://127.0.0.1:7860: make web [MODEL=dir] [HOST=0.0.0.0] [PORT=7860]
	$(BIN)/python -m controlnet_recipe web --host "$(HOST)" --port "$(PORT)" $(if $(MODEL),--model "$(MODEL)")

test: env ## the tests (fast ones, plus one whole pipeline at a very small size): about 7 min on 2 cores
	$(BIN)/python -m pytest -q -m "not slow"

# The slow set spends most of its time starting processes (each stage imports torch and diffusers)
# and in tiny models that one core runs as fast as two: two pytest workers of one thread each.
# Tests that launch two ranks on accelerate's port share an xdist_group, so they run one at a time.
# SLOW_WORKERS=0 runs them in this process, one after the other.
SLOW_WORKERS ?= 2
test-slow: env ## the slow set: every family's pipeline, kill-and-resume, DeepSpeed, the web demo (CI runs it too)
	$(if $(filter 0,$(SLOW_WORKERS)),,OMP_NUM_THREADS=1 )$(BIN)/python -m pytest -q -m slow $(if $(filter 0,$(SLOW_WORKERS)),,-n $(SLOW_WORKERS) --dist loadgroup)

lint: env ## ruff lint and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: env ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

lock: env ## rewrite requirements.lock from the current environment (requirements-deepspeed.txt's pins stay there)
	{ sed -n '1,3p' requirements.lock; $(BIN)/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' \
	  | grep -v -i -x -F -f <(grep -E '^[A-Za-z]' requirements-deepspeed.txt); } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean: ## remove pipeline outputs (not the environment)
	rm -rf data/source data/photoreal data/conditions data/captions data/cache models eval train

# The image, with docker or (no Docker engine) podman. docs/gpu-training.md: "Docker on a rented GPU".
IMAGE ?= controlnet-recipe
BASE ?=
GPU_EXTRAS ?= 1
DOCKER ?= $(shell if docker info >/dev/null 2>&1; then echo docker; elif command -v podman >/dev/null 2>&1; then echo podman; else echo docker; fi)
DOCKER_BUILD_FLAGS ?=
DOCKER_GPU_FLAGS ?= --gpus all
DOCKER_USER ?= $(shell id -u):$(shell id -g)
DOCKER_RUN_FLAGS ?=
HF_CACHE ?= $(HOME)/.cache/huggingface
DATA ?= $(CURDIR)/data
# The repository at /work, the Hugging Face cache and the data folder (DATA= a bigger disk) mounted,
# run as the owner of those folders; --ipc=host for the dataloaders' shared memory.
DOCKER_RUN = mkdir -p "$(HF_CACHE)" "$(DATA)" && $(DOCKER) run --rm $(DOCKER_GPU_FLAGS) --ipc=host --user $(DOCKER_USER) \
  -v "$(CURDIR)":/work -v "$(abspath $(HF_CACHE))":/home/recipe/.cache/huggingface -v "$(abspath $(DATA))":/work/data \
  -e HF_TOKEN -e WANDB_API_KEY $(DOCKER_RUN_FLAGS) $(IMAGE)
.PHONY: docker-build docker-smoke docker-train

docker-build: ## build the image: make docker-build [BASE=image] [GPU_EXTRAS=0] [IMAGE=name]
	$(DOCKER) build $(if $(BASE),--build-arg BASE=$(BASE)) --build-arg GPU_EXTRAS=$(GPU_EXTRAS) $(DOCKER_BUILD_FLAGS) -t $(IMAGE) .

docker-smoke: ## check the image: GPU, bitsandbytes, xformers (DOCKER_GPU_FLAGS= where there is no GPU)
	$(DOCKER_RUN) python -m controlnet_recipe doctor $(if $(strip $(DOCKER_GPU_FLAGS)),--require-gpu)

docker-train: ## the whole pipeline in the image: make docker-train GPU=24gb [RECIPE=faces]
	$(DOCKER_RUN) make train repro $(if $(GPU),GPU=$(GPU)) $(if $(RECIPE),RECIPE=$(RECIPE))

# The prepared GPU check (docs/gpu-training.md: The GPU check). On a GPU machine whose Python has torch but
# not this project's pins: `make gpu-wheels` here (PyPI reachable), carry .gpu-wheels there, then
# `make gpu-check` installs them into a scratch folder and runs benchmarks/gpu_check.py.
# DRY_RUN=1: everything but CUDA, at a tiny size, in this project's environment (tested).
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON_VERSION ?= 3.12
GPU_SITE ?= /tmp/gpu-check-site
DRY_RUN ?=
# GPU_CHECK_ARGS: benchmarks/gpu_check.py's options, e.g. GPU_CHECK_ARGS="--only transformers --time-budget 240"
GPU_CHECK_ARGS ?=
# what a machine with torch, transformers, accelerate and huggingface_hub lacks (versions: requirements.lock)
GPU_CHECK_PINS = $(shell grep -i -E '^(diffusers|pydantic|pydantic_core|annotated-types|typing-inspection|bitsandbytes)==' requirements.lock)
# DeepSpeed (flux-24gb's ZeRO-2) and the one requirement of it such a machine lacks besides pydantic
# (hjson; it has einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo, tqdm), versions from
# requirements-deepspeed.txt. DeepSpeed is a source distribution: its wheel is built here, with no
# ops (DS_BUILD_OPS=0: pure Python; its CPU Adam compiles itself on first use there) and with this
# environment's torch (no build isolation: isolation would fetch a CUDA torch).
GPU_CHECK_DS_PINS = $(shell grep -i -E '^(deepspeed|hjson)==' requirements-deepspeed.txt)
.PHONY: gpu-wheels gpu-check

gpu-wheels: env ## the wheels for make gpu-check on a bare GPU machine, into .gpu-wheels (bitsandbytes: its CUDA 13 build alone; DeepSpeed built here)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) --implementation cp \
	  $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014,--platform $(p)_x86_64) \
	  -d $(GPU_WHEELS) $(GPU_CHECK_PINS) $(filter-out deepspeed==%,$(GPU_CHECK_DS_PINS))
	cd $(GPU_WHEELS) && for w in bitsandbytes-*.whl; do \
	  zip -q -d "$$w" $$(unzip -Z1 "$$w" | grep -E 'libbitsandbytes_(cuda1[12]|rocm|xpu)' ) >/dev/null; done
	DS_BUILD_OPS=0 $(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation --no-binary deepspeed \
	  -w $(GPU_WHEELS) $(filter deepspeed==%,$(GPU_CHECK_DS_PINS))
	@ls $(GPU_WHEELS)/deepspeed-*-py3-none-any.whl >/dev/null || { echo "gpu-wheels: expected a pure-Python DeepSpeed wheel" >&2; exit 1; }
	@du -sh $(GPU_WHEELS)

gpu-check: ## the GPU check: peak memory and samples/s per tier beside the planner's prediction [DRY_RUN=1 on a CPU]
ifeq ($(DRY_RUN),1)
	$(MAKE) env
	$(BIN)/python benchmarks/gpu_check.py --dry-run $(GPU_CHECK_ARGS)
else
	@if [ -d $(GPU_WHEELS) ]; then \
	  $(PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl || exit 1; fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR)/src:$$PYTHONPATH PYTHONUNBUFFERED=1 $(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
endif
