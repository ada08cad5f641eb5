"""Query strategies behind one contract, selectable by name."""

from __future__ import annotations

import inspect
from typing import Any

from dynal.strategies.base import ScoreStrategy, Strategy
from dynal.strategies.bayesian import BALD
from dynal.strategies.diversity import Coreset
from dynal.strategies.embedding import BADGE, BAIT, EGL
from dynal.strategies.gradient import DynamicAL, DynamicALGreedy
from dynal.strategies.uncertainty import Entropy, LeastConfidence, Margin, RandomSampling

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (RandomSampling, LeastConfidence, Margin, Entropy, DynamicAL, DynamicALGreedy, BALD, Coreset, BADGE, EGL, BAIT)
}


def make_strategy(name: str | Strategy, **params: Any) -> Strategy:
    """Build a strategy by registry name (an instance is returned as it is)."""
    if isinstance(name, Strategy):
        if params:
            raise ValueError("parameters cannot be given with a strategy instance")
        return name
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[name]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = {n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind in named} - {"self"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"strategy {name!r} has no parameter(s) {unknown}; it takes {sorted(accepted) or 'none'}")
    return cls(**params)


__all__ = [
    "BADGE",
    "BAIT",
    "BALD",
    "EGL",
    "STRATEGIES",
    "Coreset",
    "DynamicAL",
    "DynamicALGreedy",
    "Entropy",
    "LeastConfidence",
    "Margin",
    "RandomSampling",
    "ScoreStrategy",
    "Strategy",
    "make_strategy",
]
