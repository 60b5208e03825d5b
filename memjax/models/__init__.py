"""Sequence models, found by name in `MODELS`."""

from memjax.models import lm  # noqa: F401  (registration)
from memjax.models.registry import MODELS


def build_model(options: dict):
    """Instantiates model `options["name"]` with the other entries as its fields."""
    options = dict(options)
    return MODELS.get(options.pop("name"))(**options)
