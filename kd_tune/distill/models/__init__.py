"""Models by name: a registry of architecture families, each a factory ``(in_shape, num_classes, **args) -> nn.Module``.

A family registers itself with :func:`register_model` in its own module of this package (``cnn.py``: the
study's CNN; ``mlp.py``, ``convnet.py``, ``resnet.py``); a user's own factory is named ``"package.module:function"``
and imported where a model is built (:func:`factory_of`). What rebuilds any model is its *model args*, ``{"arch", "args", "in_shape", "num_classes"}``
(:func:`model_args`): checkpoints, teacher caches and logged model files keep them beside the weights, so a
model rebuilds from its file alone (:func:`build`).

PyTorch only, like the whole training layer.
"""

from __future__ import annotations

# The families: each module registers itself on import (they import the registry, never this package).
from kd_tune.distill.models import cnn, convnet, mlp, resnet
from kd_tune.distill.models.registry import MODELS, Factory, build, count_parameters, factory_of, model_args, register_model

__all__ = ["MODELS", "Factory", "build", "cnn", "convnet", "count_parameters", "factory_of", "mlp", "model_args", "register_model", "resnet"]
