"""memjax.ops.dispatch: the pallas slot, the auto table and its evidence, the kernels registry."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from memjax import ops
from memjax.ops import dispatch

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def toy_kernel():
    """A stand-in kernel for linear_attention on this platform (the real one restored after)."""
    calls = []

    def kernel(q, k, v, g=None, *, scale, initial_state, normalize, chunk_size):
        calls.append(dict(scale=scale, normalize=normalize, chunk_size=chunk_size, g=g))
        return jnp.full(v.shape, 7.0, v.dtype), initial_state

    real = kernels.lookup("linear_attention", dispatch.platform())
    if real is not None:
        kernels.unregister("linear_attention", platform=dispatch.platform())
    kernels.register("linear_attention", platform=dispatch.platform())(kernel)
    yield calls
    kernels.unregister("linear_attention", platform=dispatch.platform())
    if real is not None:
        kernels.register("linear_attention", platform=dispatch.platform())(real)


def test_pallas_dispatches_to_the_registered_kernel(toy_kernel):
    q = k = jnp.ones((1, 3, 2, 4))
    v, h0 = jnp.ones((1, 3, 2, 5)), jnp.zeros((1, 2, 4, 5))
    o, state = ops.linear_attention(q, k, v, initial_state=h0, impl="pallas", chunk_size=2)
    np.testing.assert_array_equal(np.asarray(o), 7.0)
    assert state is h0
    assert toy_kernel == [dict(scale=0.5, normalize=False, chunk_size=2, g=None)]  # K ** -0.5
    # Other operators and impls are untouched by the registration.
    o_ref, _ = ops.linear_attention(q, k, v, initial_state=h0, impl="reference")
    assert not np.allclose(np.asarray(o_ref), 7.0)
    with pytest.raises(ValueError, match="no kernel is registered for 'generalized_delta_rule'"):
        ops.generalized_delta_rule(q, k, v, -jnp.ones((1, 3, 2, 4)), q, k, impl="pallas")


def test_missing_kernel_error_lists_what_exists(toy_kernel):
    with pytest.raises(ValueError, match=r"registered kernels: \[\('delta_rule', 'cpu'\), .*"
                                         r"\('ssd', 'tpu'\)\]; XLA forms of s5: "
                                         r"\('reference', 'scan', 'chunk'\)"):
        dispatch.resolve("s5", "pallas")


def test_resolve_validates_names_and_platforms():
    assert dispatch.resolve("linear_scan", "auto", "cpu") == "reference"
    assert dispatch.resolve("linear_scan", "auto", "tpu") == "scan"
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'reference', 'scan', "
                                         r"'conv', 'pallas'\), got 'associative'"):
        dispatch.resolve("s4d", "associative")
    with pytest.raises(ValueError, match="no dispatch table for platform 'metal'"):
        dispatch.resolve("ssd", "auto", "metal")
    with pytest.raises(ValueError, match="unknown operator 'nope'"):
        dispatch.resolve("nope", "auto")
    with pytest.raises(ValueError, match="platform must be one of"):
        kernels.register("linear_attention", platform="cuda")


def test_registering_twice_is_an_error(toy_kernel):
    with pytest.raises(ValueError, match="already registered"):
        kernels.register("linear_attention", platform=dispatch.platform())(lambda *a, **k: None)


@pytest.mark.parametrize("platform", sorted(dispatch.AUTO))
def test_auto_table_covers_every_op_with_a_known_form_and_evidence(platform):
    assert set(dispatch.AUTO[platform]) == set(dispatch.FORMS)
    assert set(dispatch.TUNING[platform]) <= set(dispatch.FORMS)
    for op, choice in dispatch.AUTO[platform].items():
        assert choice.form in dispatch.FORMS[op] or choice.form == "pallas", (platform, op)
        paths = re.findall(r"docs/results/[\w./-]+\.json", choice.evidence)
        assert paths or platform != "cpu", f"cpu {op}: no benchmark cited"
        for path in paths:
            assert (REPO / path).is_file(), f"{platform} {op}: {path} does not exist"
