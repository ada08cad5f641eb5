"""Plain-torch models exposing ``features(x)`` and a final linear ``head``, made by a factory."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
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


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def check_params(name: str, params: dict[str, Any]) -> None:
    """Raise a clear error for a model option of the wrong type or range: ``dropout`` in [0, 1),
    ``width`` a channel count (``cnn``) or a positive multiplier, ``hidden`` positive widths."""
    if "dropout" in params:
        d = params["dropout"]
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 <= d < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {d!r}")
    if "width" in params:
        w = params["width"]
        if name == "cnn" and not _positive_int(w):
            raise ValueError(f"the cnn's width is its first layer's channel count, a positive integer; got {w!r}")
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0 < w < math.inf:
            raise ValueError(f"width must be a positive number, got {w!r}")
    if "hidden" in params:
        h = params["hidden"]
        if name == "mlp" and not (isinstance(h, (list, tuple)) and h and all(_positive_int(v) for v in h)):
            raise ValueError(f"the mlp's hidden is a list of positive layer widths, e.g. [128]; got {h!r}")
        if name != "mlp" and not _positive_int(h):
            raise ValueError(f"hidden must be a positive integer, got {h!r}")


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
    check_params(name, params)
    cls = MODELS[name]
    factory = partial(cls, tuple(input_shape), int(n_classes), **params)
    with torch.random.fork_rng(devices=[]):  # fail now, not mid-experiment, on bad options or shapes
        factory()
    return factory


__all__ = ["MLP", "MODELS", "ResNet18", "SmallCNN", "VGG11BN", "model_factory"]
