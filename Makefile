# Two commands: `make demo` (set up, train a small PixelSNAIL on the bundled CIFAR-10 sample, report held-out
# bits/dim, write a sample grid) and `make test` (set up, run the whole test suite). Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN = $(VENV)/bin
# torch's AVX-512 ELU kernel is several times slower than its AVX2 one on these CPUs; this only picks kernels.
export ATEN_CPU_CAPABILITY ?= avx2

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test,tensorboard,plot]"
	touch $@

demo: setup
	$(BIN)/vqprior train-pixels --dataset sample --preset small --steps 100 --batch-size 8 --lr 2e-3 \
		--eval-every 100 --eval-limit 200 --sample-every 100 --checkpoint-every 50 --num-samples 16 \
		--out runs/demo $(if $(wildcard runs/demo/latest.pt),--resume,)
	@echo "Sample grid: runs/demo/samples_step100.png"

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python bench/train_speed.py
	$(BIN)/python bench/sample_speed.py

clean:
	rm -rf runs/demo
