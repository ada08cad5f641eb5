"""Type checks for the settings users write by hand (TOML configs, keyword arguments)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

# annotation (as a string, under ``from __future__ import annotations``) -> accepted types
_SIMPLE: dict[str, tuple[type, ...]] = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,), "str": (str,)}


def check_field_types(obj: Any) -> None:
    """Raise a ``TypeError`` naming the first field of the dataclass ``obj`` whose value does not
    have its annotated type (``int``, ``float``, ``bool`` or ``str``; a bool is not a number)."""
    for f in dataclasses.fields(obj):
        kinds = _SIMPLE.get(f.type) if isinstance(f.type, str) else None
        value = getattr(obj, f.name)
        if kinds is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise TypeError(f"{f.name} must be {'a number' if f.type == 'float' else 'a ' + f.type}, got {value!r}")


def is_integer(value: object) -> bool:
    """Whether ``value`` is a Python or numpy integer (a bool is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
