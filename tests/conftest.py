"""Test-session setup shared by every test file.

Eight host devices are simulated for the whole session (the flag must be set before JAX is
imported) so data-parallel tests can build a mesh; single-device code still runs on device 0.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Float64 for the duration of one test only (test processes are shared, never flip it globally)."""
    with jax.enable_x64(True):
        yield
