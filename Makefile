# `make test` and `make demo` work on a fresh machine: they build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-output

.PHONY: test demo bench clean

$(BIN)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,label,tf]'
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

demo: $(BIN)/.installed
	$(BIN)/ns-data synth images --count 300 --output $(DEMO_DIR)/images --overwrite
	$(BIN)/ns-data label $(DEMO_DIR)/images --teacher test_efficientnet --random-weights --num-classes 10 \
		--output $(DEMO_DIR)/pseudo-labels --overwrite
	$(BIN)/ns-data balance $(DEMO_DIR)/pseudo-labels --output $(DEMO_DIR)/selection --per-class 50 \
		--min-confidence 0.1 --num-classes 10 --overwrite
	$(BIN)/ns-data shard $(DEMO_DIR)/selection --output $(DEMO_DIR)/shards --num-shards 4 --overwrite
	$(BIN)/ns-data inspect $(DEMO_DIR)/shards

bench: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/balance.py
	$(BIN)/python benchmarks/label.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
