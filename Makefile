# Every target bootstraps .venv on first use (a fresh clone needs nothing else).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUNDIR ?= runs/mqar_main

.PHONY: setup run test test-slow test-all bench clean

setup: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || { py=$$(scripts/find_python.sh) && echo "creating $(VENV) with $$py" && $$py -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# The main job: a 2-layer DeltaNet (no attention) on MQAR (T=64, 4 pairs, vocab 256), then test
# accuracy and the key-swap recall probe.
run: $(STAMP)
	$(PY) scripts/train.py --config configs/mqar.py:model=deltanet,vocab=256 --workdir $(RUNDIR)

# Fast suite (< 20 min on 2 CPU cores). Slow checks are marked `slow` and run by test-slow.
test: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -m slow tests

test-all: $(STAMP)
	$(PY) -m pytest -n 2 tests

# Operator benchmarks (JSON in bench.json). Huge pages for malloc: without them, page faults on
# fresh buffers of 32 MB and more distort timings at long T on this machine.
BENCH_ARGS ?= --ops linear_attention,gated_delta_rule --T 1024,4096,16384,65536
bench: $(STAMP)
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(PY) scripts/bench.py $(BENCH_ARGS) --out bench.json

clean:
	rm -rf $(VENV) runs .pytest_cache
