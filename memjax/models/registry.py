"""The model registry: sequence models are found by `config.model.name`."""

from memjax.registry import Registry

MODELS = Registry("model")
