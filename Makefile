# `make test` and `make demo` work on a fresh machine: they build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-output

.PHONY: test demo bench clean

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,label]'
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

demo: $(BIN)/.installed
	$(BIN)/ns-data synth pseudo-labels --rows 300000 --classes 100 --files 4 --invalid-fraction 0.002 \
		--output $(DEMO_DIR)/pseudo-labels --overwrite
	$(BIN)/ns-data balance $(DEMO_DIR)/pseudo-labels --output $(DEMO_DIR)/selection --per-class 2000 --overwrite

bench: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/balance.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
