# Two commands: `make demo` (set up; samples and completions of held-out images from the shipped models, a short
# training of a small PixelSNAIL on the bundled CIFAR-10 sample with its sample grid and curves, an index saying
# which picture is which: scripts/demo.py) and `make test` (set up, run the test suite but the few tests marked
# `slow`, which `make test-slow` runs; CI runs both: .ci/run). Both create .venv.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN = $(VENV)/bin

.PHONY: setup demo test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test,tensorboard,compress,plot]"
	touch $@

demo: setup
	$(BIN)/python scripts/demo.py --out runs/demo

test: setup
	$(BIN)/python -m pytest -q tests -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q tests -m slow

bench: setup
	$(BIN)/python bench/train_speed.py
	$(BIN)/python bench/sample_speed.py

clean:
	rm -rf runs/demo
