# The quick start is `make demo` and `make test`; both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `pip install torch==2.13.0` gives the CPU build on this project's machines only because they carry a local wheel
# folder with it; on an ordinary machine it installs the platform default (the CUDA build on Linux, several GB).
TORCH_PIN := torch==2.13.0

.PHONY: demo test bench venv dev clean check lint format-check types package fix check-extras

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

# `make bench`: every benchmark, one final JSON line (docs/performance.md says what each key means); also redraws
# docs/scaling.png, the cost curve. Needs ~9 GiB of free RAM and disk for the 4 GiB point; BENCH_ARGS=--quick for a
# short run. About 26 minutes on the 2-core development VM; run it on a quiet machine: the ratios are side by side,
# but the step overhead is sensitive to load.
bench: $(BIN)/.dev-installed
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

# `make check`: is my change clean? Lint, format, types and packaging; every gate runs, then the first failure
# decides the exit status, so one run shows everything to fix. Configuration: pyproject.toml ([tool.ruff],
# [tool.mypy]); CONTRIBUTING.md says more. Each gate also runs alone: make lint / format-check / types / package.
check: $(BIN)/.dev-installed
	@status=0; \
	for gate in lint format-check types package; do \
		echo "== $$gate"; $(MAKE) --no-print-directory $$gate || status=1; \
	done; \
	if [ $$status -ne 0 ]; then echo "make check: FAILED (see above; 'make fix' repairs lint and format findings)"; fi; \
	exit $$status

# One line per finding; `.venv/bin/ruff check PATH` shows each with its context and the suggested fix.
lint: $(BIN)/.dev-installed
	$(BIN)/ruff check --output-format concise .

format-check: $(BIN)/.dev-installed
	$(BIN)/ruff format --check .

types: $(BIN)/.dev-installed
	$(BIN)/mypy

package: $(BIN)/.dev-installed
	$(BIN)/python scripts/check_package.py

# Rewrites files: the safe lint fixes (import order, modern annotations, unused noqa), then the formatter; prints
# what is left to fix by hand (--exit-zero: the formatter must run even when findings remain).
fix: $(BIN)/.dev-installed
	$(BIN)/ruff check --fix --exit-zero --output-format concise .
	$(BIN)/ruff format .

# Slow (a fresh venv per extra, packages from the index): not part of `make check`. See scripts/check_extras.py.
check-extras: $(BIN)/.dev-installed
	$(BIN)/python scripts/check_extras.py $(EXTRAS_ARGS)

clean:
	rm -rf $(VENV) demo-run bench-out build dist .mypy_cache .ruff_cache

# `make test-frameworks`: the seed guide's recipes against the real frameworks (LLaMA-Factory SFT with the seed's
# ${train_output} YAML; DeepSpeed ZeRO-1 on CPU under torchrun), each under `resumekit run` with SIGKILLs and
# compared bitwise with a straight run. Heavy (a second venv of several GB, minutes of CPU): not in `make test`, not
# in CI. tests/frameworks/setup_venv.sh says what it installs and why.
FW_VENV := .venv-frameworks
.PHONY: test-frameworks
$(FW_VENV)/.installed: pyproject.toml tests/frameworks/setup_venv.sh
	PY=$(PY) TORCH_PIN=$(TORCH_PIN) bash tests/frameworks/setup_venv.sh $(FW_VENV)
	touch $@

test-frameworks: $(FW_VENV)/.installed
	DS_ACCELERATOR=cpu $(FW_VENV)/bin/python tests/frameworks/run_frameworks.py $(FRAMEWORKS_ARGS)
