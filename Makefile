# Two commands set up a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export DS_BUILD_OPS := 0
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: env test lint unit integration demo bench gpu-check clean

env: $(STAMP)

# torch first: pip's configuration finds the local CPU build for this exact pin; any
# other package asking for torch afterwards is then satisfied and pulls no CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# DeepSpeed compiles its shared-memory comm op on first use (~1 min), in whichever
	# worker gets there first; a worker killed mid-build leaves a lock that stalls every
	# later run. Build it here, once, with the ninja training uses (train/ds_ops.py).
	$(BIN)/python -m uniloom.pipelines.train.ds_ops
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: $(STAMP)
	$(BIN)/pytest -q -m "not integration" tests

integration: $(STAMP)
	$(BIN)/pytest -q -m integration tests

test: lint $(STAMP)
	$(BIN)/pytest -q -rs --durations=25 tests

# The whole workflow on the embedded default: tiny preset, local Ray, MLflow on SQLite, CPU.
demo: $(STAMP)
	$(BIN)/uniloom run --workspace workspace

# Speed targets: each prints ratios measured side by side in one run (see `uniloom bench --help`).
bench: $(STAMP)
	$(BIN)/uniloom bench tokenizer
	$(BIN)/uniloom bench data
	$(BIN)/uniloom bench train
	$(BIN)/uniloom bench kernels

# On one GPU, at most 8 minutes: the GPU tests, the data stage's encoder images/s and
# `bench train --preset base` (MFU, tokens/s, peak memory); without CUDA it says so.
gpu-check: $(STAMP)
	$(BIN)/python -m uniloom.pipelines.gpu_check

clean:
	rm -rf workspace .ruff_cache
