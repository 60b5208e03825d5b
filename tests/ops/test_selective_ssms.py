"""What is specific to Mamba's selective scan and Mamba-2's SSD beyond the operator contract
(test_contract.py): no skip connection (Dskip=None), and chunk sizes from 1 to longer than T."""

import jax.numpy as jnp
import pytest
from contract import assert_outputs, inputs, oracle
from specs import SELECTIVE_SCAN, SSD


@pytest.mark.parametrize("spec", [SELECTIVE_SCAN, SSD], ids=lambda s: s.id)
@pytest.mark.parametrize("chunk_size", [1, 5, 11, 64])
def test_chunk_size_sweep_without_skip_f64(x64, spec, chunk_size):
    args, h0 = inputs(spec, 2, spec.T)
    args = {**args, "Dskip": None}
    got = spec.run({**args, "initial_state": h0, "impl": "chunk", "chunk_size": chunk_size})
    assert_outputs(spec, got, oracle(spec, args, h0), spec.f64_tol, f"C={chunk_size}")


def test_dskip_none_is_zero_skip_f64(x64):
    for spec in (SELECTIVE_SCAN, SSD):
        args, h0 = inputs(spec, 3, 5)
        zero = {**args, "Dskip": jnp.zeros_like(args["Dskip"])}
        y0, s0 = spec.run({**zero, "initial_state": h0, "impl": "auto"})
        y, s = spec.run({**args, "Dskip": None, "initial_state": h0, "impl": "auto"})
        assert_outputs(spec, (y, s), (y0, s0), 0.0, "Dskip=None")
