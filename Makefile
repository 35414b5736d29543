# Everything a fresh machine needs: `make demo` (README command 1) and `make test` (command 2).
# Both create or reuse the virtual environment in $(VENV); torch is installed first, pinned to the
# CPU wheel, so that no loose requirement can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.scmm-atlas-installed

.PHONY: demo test test-fast lint bench-deps clean

# --no-compile: pip would byte-compile all ~25,000 modules of the dependencies (~45 s of one core); Python
# compiles the few thousand that are imported, once, on first import.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile "$(TORCH)"
	$(BIN)/python -m pip install -q --no-compile -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/scmm-atlas demo

# The whole suite on two pytest-xdist workers (one per core; four saturated the CPUs and broke timing-bound
# fault tests). Whole modules go to a worker (--dist loadscope: a module's fixtures start once), longest
# first (tests/conftest.py: LONGEST_FIRST); each worker has its own local Ray.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

# The edit-test loop (under 2 minutes): no end-to-end runs, no Ray, no S3 server, no browser; one
# pytest-xdist worker per core (these tests share no session fixture, so they run apart).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto -m "not slow and not ray and not s3 and not browser"

lint: $(STAMP)
	$(BIN)/ruff check scmm_atlas pipelines tests

bench-deps: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,bench]"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
