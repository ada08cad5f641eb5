"""Plain-torch models exposing ``features(x)`` and a final linear ``head``, made by a factory."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from dynal.models.cnn import SmallCNN
from dynal.models.mlp import MLP
from dynal.models.resnet import ResNet18
from dynal.models.vgg import VGG11BN

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet18": ResNet18,
    "vgg11": VGG11BN,
}


def model_factory(name: str, input_shape: tuple[int, ...], n_classes: int, **params) -> Callable[[], nn.Module]:
    """Return a zero-argument callable that builds a fresh, newly initialized model.

    Parameters
    ----------
    name : {"mlp", "cnn", "resnet18", "vgg11"}
    input_shape : shape of one input, e.g. ``(1, 28, 28)`` or ``(64,)``
    n_classes : number of outputs of the head
    **params : model options (``hidden``, ``width``, ``dropout``, ...)
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[name]
    factory = partial(cls, tuple(input_shape), int(n_classes), **params)
    factory()  # fail now, not mid-experiment, on bad options or shapes
    return factory


__all__ = ["MLP", "MODELS", "ResNet18", "SmallCNN", "VGG11BN", "model_factory"]
