# Two commands do all the set-up on a fresh machine (Python >= 3.10):
#   make bench   -> creates .venv on first use, runs the quick benchmark suite on Omniglot
#   make test    -> creates .venv on first use, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
export METAFEW_DATA ?= $(abspath ../shared/data)

.PHONY: test bench venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

bench: $(BIN)/.installed
	$(BIN)/metafew bench --suite quick --out results/quick.json --overwrite

clean:
	rm -rf $(VENV) results
