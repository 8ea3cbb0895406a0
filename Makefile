# fastmini: every target creates .venv itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. This
# project's machines hold the CPU wheel; elsewhere name PyTorch's CPU index, e.g.
# `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` (PyPI's torch is the CUDA build).
TORCH := torch==2.13.0
TORCH_INDEX ?=

.PHONY: venv test demo demo-foundation bench bench-gpu kernel-resources device-wheels lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[dev,demo]"
	touch $(STAMP)

venv: $(STAMP)

# The GPU machine's triton (its python3 holds torch 2.11 and triton 3.6), whose compiler refuses code that this
# venv's triton and the interpreter take: `make test` also builds every kernel launch for sm_90 with it
# (tests/test_kernels_compile_for_hopper.py), in a venv of that triton alone that sees this venv's packages.
DEVICE_TRITON := triton==3.6.0
DEVICE_TRITON_VENV := .venv-device-triton
DEVICE_TRITON_STAMP := $(DEVICE_TRITON_VENV)/.installed-stamp

$(DEVICE_TRITON_STAMP): $(STAMP)
	$(PYTHON) -m venv $(DEVICE_TRITON_VENV)
	$(DEVICE_TRITON_VENV)/bin/pip install --quiet $(DEVICE_TRITON)
	$(BIN)/python -c "import site; print(f'import site; site.addsitedir({site.getsitepackages()[0]!r})')" \
		> "$$($(DEVICE_TRITON_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/fastmini-venv.pth"
	touch $(DEVICE_TRITON_STAMP)

test: $(STAMP) $(DEVICE_TRITON_STAMP)
	FASTMINI_SM90_COMPILER_PYTHON=$(DEVICE_TRITON_VENV)/bin/python $(BIN)/pytest tests/

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

# The bench extra (onnxruntime, onnx, onnxscript; dev has them too, for the ONNX export tests).
bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,demo,bench]"
	$(BIN)/pytest benchmarks/ --benchmark-only

# On the lent GPU machine, whose python3 already holds torch, triton and transformers (no venv):
# GPU tests + the GPU benchmarks in one call, written to benchmarks/results/<date>-<gpu>.md.
# That machine has no package registry and no `datasets` (the trainers need it): run
# `make device-wheels` here first and carry .device-wheels; bench-gpu installs what it finds there.
# A subset: make bench-gpu BENCH_GPU_ARGS="--label encoder benchmarks/test_encoder_forward_gpu.py".
bench-gpu:
	if [ -d $(DEVICE_WHEELS) ]; then python3 -m pip install --quiet --no-index --no-deps $(DEVICE_WHEELS)/*.whl; fi
	python3 -m pip install --quiet --no-build-isolation --no-deps -e .
	python3 benchmarks/run_gpu.py $(BENCH_GPU_ARGS)

# Registers, spills and shared memory of every Triton launch at the published sizes, compiled for sm_90 here
# (no GPU needed), by the GPU machine's triton: where a GPU sweep should look first.
kernel-resources: $(STAMP) $(DEVICE_TRITON_STAMP)
	FASTMINI_SM90_COMPILER_PYTHON=$(DEVICE_TRITON_VENV)/bin/python $(BIN)/python benchmarks/kernel_resources.py

# Wheels for the GPU machine's python 3.12 that its image lacks (datasets and its own pins).
DEVICE_WHEELS := .device-wheels
device-wheels: $(STAMP)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --implementation cp \
		-d $(DEVICE_WHEELS) datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1 fsspec==2026.9.0

lint: $(STAMP)
	$(BIN)/ruff check fastmini kernels tests benchmarks examples

clean:
	rm -rf $(VENV) $(DEVICE_TRITON_VENV) outputs .pytest_cache .benchmarks
