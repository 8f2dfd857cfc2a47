# Two entry points: `make run` (the whole pipeline on the embedded default) and `make test`.
# Both create .venv when it is missing or older than pyproject.toml; a second call reinstalls nothing.
# The newest Python 3.11-3.13 that runs here (a pyenv shim of an inactive version fails, so run it), or PYTHON=.
PYTHON ?= $(or $(shell for v in 3.13 3.12 3.11; do python$$v -c '' 2>/dev/null && { echo python$$v; break; }; done),python3)
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

.PHONY: run test lint bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/dse run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	@$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python -m kernels.bench
	$(BIN)/python -m dse.benchmarks

clean-venv:
	rm -rf $(VENV)
