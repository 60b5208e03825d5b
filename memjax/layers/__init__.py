"""Flax Linen layers. Importing this package registers every mixer in `MIXERS`."""

from memjax.layers import attention, delta_net, linear_attention, retnet, rwkv7  # noqa: F401  (registration)
from memjax.layers.conv import ShortConv
from memjax.layers.mlp import GatedMLP
from memjax.layers.registry import MIXERS, build_mixer, mixer_options
