"""Test-session setup shared by every test file.

Eight host devices are simulated for the whole session (the flag must be set before JAX is
imported) so data-parallel tests can build a mesh; single-device code still runs on device 0.

Every program is compiled without XLA's LLVM optimisations: they take most of the compile time
of the tests' tiny programs and buy nothing at their size (HLO passes, which decide precision,
still run). tests/layers/test_decoding.py took 331 s with them off against 637 s on, one worker
beside a training run. Processes the tests start (scripts/train.py) inherit the flags.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402

# One persistent compilation cache for the session, shared by the xdist workers (they inherit the
# directory through the environment from the controller, which creates it): many tests compile the
# same train step or operator again (a resumed run, another test on the same config), and
# compiling dominates on 2 CPU cores: a 20-step smoke run takes ~22 s compiled afresh, ~5 s from
# the cache; tests/train/test_trainer.py ran about 2x faster, and files without repeated train
# steps (test_delta_rule, test_mom) about 10% faster, side by side under the same load.
# Subprocesses a test starts (scripts/train.py) keep their own compiles: the cache is set here, in
# the pytest processes only. A fresh directory per session, removed at the end, so no session
# depends on an earlier one.
_CACHE_VARIABLE = "MEMJAX_TEST_COMPILATION_CACHE"
_OWNS_CACHE = _CACHE_VARIABLE not in os.environ
if _OWNS_CACHE:
    os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="memjax-test-compilation-cache-")
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if _OWNS_CACHE:
        shutil.rmtree(os.environ.pop(_CACHE_VARIABLE), ignore_errors=True)


@pytest.fixture
def x64():
    """Float64 for the duration of one test only (test processes are shared, never flip it globally)."""
    with jax.enable_x64(True):
        yield
