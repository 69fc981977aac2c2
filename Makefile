# `make demo` and `make test` work from a fresh clone: they create .venv and install what they need.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo

.PHONY: demo test lint bench data docs

# The demo needs the package alone; tests and lint add the development tools (pytest, ruff, mypy, the optional
# loggers they test) on first use.
$(BIN)/blockssl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/pytest: $(BIN)/blockssl pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's package (installed when running as root and missing).
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or set data.root"; exit 1; fi; \
	fi

# Pretrain the default recipe (resuming it if $(RUN) exists), then probe every block beside its references: the
# same network at random initialisation and raw pixels, through each block's head. The plain-pooling readout, the
# probes on 1% and 10% of the labels and kNN-200 are left out to keep the demo near 10 minutes on 2 cores
# (blockssl probe $(RUN) adds them).
demo: $(BIN)/blockssl data
	@if [ -f $(RUN)/config.yaml ]; then $(BIN)/blockssl pretrain --resume $(RUN); \
	else $(BIN)/blockssl pretrain --config configs/fashion_mnist.yaml out=$(RUN); fi
	$(BIN)/blockssl probe $(RUN) --random-init --pixels "probe.readouts=[head]" \
	  "probe.label_fractions=[]" "probe.knn_k=[20]"

test: $(BIN)/pytest
	$(BIN)/python -m pytest tests

lint: $(BIN)/pytest
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

# The documentation site (docs/, mkdocs.yml) into site/; --strict makes every warning (a broken link or anchor, a
# missing included file) an error. The docs extra is installed into the venv on first use.
$(BIN)/mkdocs: $(BIN)/blockssl pyproject.toml
	$(BIN)/pip install --quiet -e '.[docs]'
	touch $@

docs: $(BIN)/mkdocs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

# Step speed and memory measured; then what the paper's ResNet-50 and the default recipe cost, counted per block and
# part beside their end-to-end models (blockssl cost: parameters, FLOPs, optimizer state, communication, activations),
# and the recipe at end to end's cost (the pooled CbE) as a pipeline of 4 stages on 16 devices, its blocks as the
# paper's and balanced.
bench: $(BIN)/blockssl
	$(BIN)/python benchmarks/step_throughput_memory.py
	$(BIN)/blockssl cost --config configs/imagenet/barlow_twins_blockwise_noise.yaml
	$(BIN)/blockssl cost --config configs/fashion_mnist.yaml
	$(BIN)/blockssl cost --config configs/imagenet/barlow_twins_blockwise_pooled_cbe.yaml train.execution=pipeline
	$(BIN)/blockssl cost --config configs/imagenet/barlow_twins_blockwise_pooled_cbe.yaml train.execution=pipeline \
		model.granularity=unit --balance 4
