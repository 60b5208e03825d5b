"""BaseConv: the gated short convolution of Based's language models (Arora et al., 2024)."""

import flax.linen as nn

from memjax.layers.conv import ShortConv
from memjax.layers import initializers
from memjax.layers.registry import MIXERS


@MIXERS.register("base_conv")
class BaseConv(nn.Module):
    """BaseConv (Arora et al., 2024; Zoology's `BaseConv`): a gated causal short convolution.

    With `h = expand * d_model`: `u = W_u x`, `g = W_g x` (`[B, T, h]` each), then
    `y = W_out(ShortConv_{conv_size}(u) * g)`: a depthwise causal convolution of `conv_size`
    taps over u (`memjax.layers.conv.ShortConv`), times the gate elementwise, projected back to
    d_model. No recurrent memory: each output sees only the last `conv_size` tokens, so Based's
    layout puts it between Taylor linear attention and sliding-window attention layers
    (`memjax.config.LAYER_PATTERNS["based_published"]`). `[B, T, d_model]` in and out; decoding
    cache `{"conv": [B, conv_size - 1, h]}` (the convolution's history of u).
    """

    own_short_conv = True  # the block adds no short convolution in front (not a field)

    d_model: int
    expand: int = 4
    conv_size: int = 3

    @nn.compact
    def __call__(self, x, cache=None):
        width = self._width()
        u = initializers.dense(width, name="u")(x)
        g = initializers.dense(width, name="g")(x)
        conv = ShortConv(self.conv_size, name="conv")
        if cache is None:
            u = conv(u)
        else:
            u, conv_cache = conv(u, cache["conv"])
        y = initializers.dense_out(self.d_model, name="out")(u * g)
        return y if cache is None else (y, {"conv": conv_cache})

    def _width(self) -> int:
        if self.expand < 1 or self.conv_size < 1:
            raise ValueError(f"base_conv needs expand >= 1 and conv_size >= 1, got expand "
                             f"{self.expand}, conv_size {self.conv_size}")
        return self.expand * self.d_model

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        return {"conv": ShortConv(self.conv_size, parent=None).init_cache(batch_size, self._width())}
