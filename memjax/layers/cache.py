"""Size of a layer's decoding cache, read from the shapes `init_cache` would allocate."""

import jax


def cache_bytes(module, seq_len: int) -> int:
    """Bytes of `module.init_cache(1, seq_len)` (one sequence after `seq_len` tokens): the
    recurrent state a mixer or model keeps to decode, computed without allocating it."""
    cache = jax.eval_shape(lambda: module.init_cache(1, seq_len))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
