# The quick start is `make demo` and `make test`; both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `pip install torch==2.13.0` gives the CPU build on this project's machines only because they carry a local wheel
# folder with it; on an ordinary machine it installs the platform default (the CUDA build on Linux, several GB).
TORCH_PIN := torch==2.13.0

.PHONY: demo test bench venv dev clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.dev-installed: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed
dev: $(BIN)/.dev-installed

demo: $(BIN)/.installed
	$(BIN)/resumekit demo

test: $(BIN)/.dev-installed
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(BIN)/.dev-installed
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-run bench-out
