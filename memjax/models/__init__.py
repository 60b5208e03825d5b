"""Sequence models, found by name in `MODELS`."""

from memjax.models import lm  # noqa: F401  (registration)
from memjax.models.registry import MODELS


def build_model(options: dict):
    """Instantiates model `options["name"]` with the other entries as its fields."""
    options = dict(options)
    if "init" in options:  # `config.model.init` (the name `init` is taken by flax's Module.init)
        options["init_scheme"] = options.pop("init")
    return MODELS.get(options.pop("name"))(**options)
