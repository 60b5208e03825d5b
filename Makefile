# Every target bootstraps .venv on first use (a fresh clone needs nothing else).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUNDIR ?= runs/mqar_main

.PHONY: setup constraints run test test-extended test-integration test-slow test-multiprocess test-kernels test-all bench clean

# Installs the exact versions pinned in constraints.txt (pip included), so tests and committed
# results are reproduced with the packages they were produced with.
setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	@test -x $(PY) || { py=$$(scripts/find_python.sh) && echo "creating $(VENV) with $$py" && $$py -m venv $(VENV); }
	$(PY) -m pip install --quiet -c constraints.txt pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $(STAMP)

# Refreshes constraints.txt from what .venv has installed now (after upgrading a package on
# purpose): every distribution at its exact version, memjax itself excluded.
constraints:
	@test -x $(PY) || { echo "no $(VENV): run make setup first"; exit 1; }
	{ echo "# pip freeze --all of .venv (make constraints); make setup installs with -c constraints.txt"; \
	  $(PY) -m pip freeze --all --exclude-editable --exclude memjax; } > constraints.txt

# The main job: a 2-layer DeltaNet (no attention) on MQAR (T=64, 4 pairs, vocab 256), then test
# accuracy and the key-swap recall probe. The block's short convolution is kept in front of
# DeltaNet's own (stack_short_convs): measured to reach 0.99 in ~500 steps against ~1400 without.
run: $(STAMP)
	$(PY) scripts/train.py --config configs/mqar.py:model=deltanet,vocab=256 --workdir $(RUNDIR) \
		--config.model.stack_short_convs=True

# The unit suite: operators against their float64 oracles, layers, models, configs. Tests that
# run a whole program end to end (the trainer, task smoke trainings, sweeps, benchmarks) are
# marked `integration` and run by test-integration; the slow learning tests by test-slow. The
# rest of the option cross-products (oracle and decoding variants beyond each mixer's first case)
# are marked `extended` and run by test-extended (about 3 minutes of `make test`'s time).
# .ci/run runs test, test-extended, test-integration and test-multiprocess.
test: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow and not integration and not extended" --durations=25 tests

test-extended: $(STAMP)
	$(PY) -m pytest -n 2 -m "extended and not slow and not integration" --durations=10 tests

test-integration: $(STAMP)
	$(PY) -m pytest -n 2 -m "integration and not slow" --durations=10 tests

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -m slow tests

# scripts/train.py as two processes on localhost (gloo collectives) against one process: equal
# metrics, a SIGTERM to one process stops both, a 2-process checkpoint resumes in one (~2 min).
test-multiprocess: $(STAMP)
	$(PY) -m pytest -m slow tests/train/test_multiprocess.py

# The Pallas kernels in interpret mode and their TPU / CUDA lowering, slow cases included.
test-kernels: $(STAMP)
	$(PY) -m pytest -n 2 tests/kernels tests/ops/test_dispatch.py

test-all: $(STAMP)
	$(PY) -m pytest -n 2 tests

# Operator benchmarks (JSON in bench.json). Huge pages for malloc: without them, page faults on
# fresh buffers of 32 MB and more distort timings at long T on this machine.
BENCH_ARGS ?= --ops linear_attention,gated_delta_rule --T 1024,4096,16384,65536
bench: $(STAMP)
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(PY) scripts/bench.py $(BENCH_ARGS) --out bench.json

clean:
	rm -rf $(VENV) runs .pytest_cache
