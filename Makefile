# Two commands do all the set-up on a fresh machine (Python >= 3.10):
#   make bench   -> creates .venv on first use, runs the quick benchmark suite on Omniglot
#   make test    -> creates .venv on first use, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Datasets are read from --data-root, else $METAFEW_DATA, else ~/.cache/metafew/data; in a
# checkout with ../shared/data beside it (development, CI) that folder is also searched, with a
# note saying so. `make bench` downloads what it needs on first use (md5-checked, resumable).
# `make test` reads the real datasets the tests use: without ../shared/data or $METAFEW_DATA it
# first fetches them into ~/.cache/metafew/data (`make data`, once).
TEST_DATASETS ?= omniglot omniglot-lake pneumoniamnist breastmnist caltech101

.PHONY: test bench data venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

data: $(BIN)/.installed
	for d in $(TEST_DATASETS); do $(BIN)/metafew data download $$d || exit 1; done

test: $(BIN)/.installed
	@if [ -z "$$METAFEW_DATA" ] && [ ! -d ../shared/data ]; then $(MAKE) data; fi
	METAFEW_DATA="$${METAFEW_DATA:-$$($(BIN)/python -c 'import metafew.paths as p; print(p.data_roots()[-1])')}" \
	  $(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

bench: $(BIN)/.installed
	$(BIN)/metafew bench --suite quick --out results/quick.json --overwrite

clean:
	rm -rf $(VENV) results
