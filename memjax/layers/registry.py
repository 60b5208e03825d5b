"""The mixer registry: token mixers are found by the name in `config.model.mixer.name`."""

import dataclasses

from memjax.registry import Registry

MIXERS = Registry("mixer")

# Fields every mixer has that are set by the model, not by the mixer's own config.
_MODEL_OWNED_FIELDS = ("d_model", "parent", "name")


def mixer_options(name: str) -> dict:
    """The configurable fields of a registered mixer and their defaults (for locked configs)."""
    cls = MIXERS.get(name)
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.name not in _MODEL_OWNED_FIELDS and f.default is not dataclasses.MISSING
    }


def has_own_short_conv(name: str) -> bool:
    """Whether mixer `name` convolves its own projections (class attribute `own_short_conv`),
    so the block's short convolution in front of it would be a second one in a row."""
    return getattr(MIXERS.get(name), "own_short_conv", False)


def build_mixer(d_model: int, options: dict, **module_kwargs):
    """Instantiates mixer `options["name"]` with the remaining options as its fields."""
    options = dict(options)
    name = options.pop("name")
    known = mixer_options(name)
    unknown = set(options) - set(known)
    if unknown:
        raise ValueError(f"mixer {name!r} has no option(s) {sorted(unknown)}; known: {sorted(known)}")
    return MIXERS.get(name)(d_model=d_model, **options, **module_kwargs)
