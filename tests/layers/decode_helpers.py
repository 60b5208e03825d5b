"""Shared by the decoding tests: a prompt in one call, then the rest one token per call."""

import jax.numpy as jnp


def prefill_then_decode(apply, inputs, prompt: int, cache):
    """``apply(chunk, cache) -> (outputs, cache)`` on ``inputs[:, :prompt]``, then on each later
    position alone. Returns the outputs of every position, concatenated along time
    (``[B, T, ...]``, comparable with one full forward pass), and the final cache."""
    outputs, cache = apply(inputs[:, :prompt], cache)
    pieces = [outputs]
    for t in range(prompt, inputs.shape[1]):
        outputs, cache = apply(inputs[:, t : t + 1], cache)
        pieces.append(outputs)
    return jnp.concatenate(pieces, axis=1), cache
