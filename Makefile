# Fresh machine to a training run or a test run; everything lands in .venv.
PYTHON ?= python3
VENV := .venv
# torch is pinned here (not in pyproject, which takes a range) to the build this
# project is tested with; pip takes it from a local wheel cache when one exists.
TORCH := torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

.PHONY: setup train test lint bench
setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/distrib train --config configs/local.yaml

test: setup
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check distrib tests bench

bench: setup
	$(VENV)/bin/python bench/core_throughput.py
