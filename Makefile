# `make test` and `make demo` work on a fresh machine: they build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-output

.PHONY: test chromium demo demo-synth bench clean

$(BIN)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,label,tf,train,demo,report,gcp]'
	touch $@

test: $(BIN)/.installed chromium
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/python -m pytest -q tests

# The browser tests (tests/browser.py) need chromium: install Debian's when it is missing and we can (root,
# apt-get); otherwise they skip with the reason. A no-op when chromium is already on PATH.
chromium:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 || \
		echo "make: apt-get install chromium failed; the browser tests will skip"

# Noisy Student end to end on scikit-learn's digits: the digits written as a user's corpus (ns_train/digits.py),
# then configs/digits.yaml run by `ns-train loop` (teacher -> label -> balance -> shard -> student, twice, plus
# the no-noise ablation, for 5 seeds). Prints the test accuracy table, writes $(DEMO_DIR)/results.png and
# $(DEMO_DIR)/report.html (seed 0's outputs and runs). Re-running continues where it stopped.
demo: $(BIN)/.installed
	$(BIN)/python -m ns_train.digits --output $(DEMO_DIR)/data --seeds 0 1 2 3 4 --labeled-per-class 2
	$(BIN)/ns-train loop configs/digits.yaml --output $(DEMO_DIR)
	$(BIN)/ns-data report $(DEMO_DIR)/seed-0 --ground-truth $(DEMO_DIR)/data/seed-0/unlabeled-labels.parquet \
		--output $(DEMO_DIR)/report.html --no-progress

# The data stages alone on synthetic images with a tiny random teacher (about 30 s).
demo-synth: $(BIN)/.installed
	$(BIN)/ns-data synth images --count 300 --output $(DEMO_DIR)-synth/images --overwrite
	$(BIN)/ns-data label $(DEMO_DIR)-synth/images --teacher test_efficientnet --random-weights --num-classes 10 \
		--output $(DEMO_DIR)-synth/pseudo-labels --overwrite
	$(BIN)/ns-data balance $(DEMO_DIR)-synth/pseudo-labels --output $(DEMO_DIR)-synth/selection --per-class 50 \
		--min-confidence 0.1 --num-classes 10 --overwrite
	$(BIN)/ns-data shard $(DEMO_DIR)-synth/selection --output $(DEMO_DIR)-synth/shards --num-shards 4 --overwrite
	$(BIN)/ns-data inspect $(DEMO_DIR)-synth/shards
	$(BIN)/ns-data report $(DEMO_DIR)-synth --output $(DEMO_DIR)-synth/report.html --no-progress

# TIMM_REPO=DIR (a checkout of huggingface/pytorch-image-models) adds timm's inference.py to the label benchmark.
bench: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/balance.py
	$(BIN)/python benchmarks/label.py $(if $(TIMM_REPO),--timm-repo $(TIMM_REPO))
	$(BIN)/python benchmarks/shard.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/report.py
	$(BIN)/python benchmarks/scale.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) $(DEMO_DIR)-synth
