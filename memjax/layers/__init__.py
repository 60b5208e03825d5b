"""Flax Linen layers. Importing this package registers every mixer in `MIXERS`."""

from memjax.layers import (  # noqa: F401  (registration)
    attention, base_conv, based, delta_net, gla, linear_attention, retnet, rwkv7, s4d, s5)
from memjax.layers import mamba, mamba2  # noqa: F401  (registration)
from memjax.layers import hippo_rnn, neural_memory, rnn, titans_mac  # noqa: F401  (registration)
from memjax.layers import bmojo, hippocampus, infini_attention, mom  # noqa: F401  (registration)
from memjax.layers.conv import ShortConv
from memjax.layers.mlp import GatedMLP
from memjax.layers.registry import MIXERS, build_mixer, mixer_options

__all__ = ["MIXERS", "GatedMLP", "ShortConv", "build_mixer", "mixer_options"]
