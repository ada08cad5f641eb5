"""Random sampling and the uncertainty baselines on eval-mode class probabilities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.special import entr

from dynal.strategies.base import ScoreStrategy


def other_classes(probs: np.ndarray) -> np.ndarray:
    """A copy of ``probs`` with each row's most likely class set to 0: the probabilities that,
    summed, give ``1 - max_k p_k`` without the rounding of ``1 - p`` near 1."""
    p = probs.copy()
    p[np.arange(len(p)), p.argmax(axis=1)] = 0.0
    return p


class RandomSampling(ScoreStrategy):
    """Uniform random sampling: every score ties, so the generator's tie keys decide."""

    name = "random"

    def score(self, chunk: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> np.ndarray:
        return np.zeros(len(chunk["ids"]))


class LeastConfidence(ScoreStrategy):
    """Least confidence: ``1 - max_k p_k``, summed from the other classes' probabilities so that
    confident samples keep their order where ``1 - max_k p_k`` would round to 0."""

    name = "least-confidence"
    outputs = ("probs",)

    def score(self, chunk: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> np.ndarray:
        return other_classes(chunk["probs"]).sum(axis=1)


class Margin(ScoreStrategy):
    """Smallest margin: ``-(p_(1) - p_(2))``, the gap between the two most likely classes."""

    name = "margin"
    outputs = ("probs",)

    def score(self, chunk: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> np.ndarray:
        top2 = np.partition(chunk["probs"], -2, axis=1)[:, -2:]
        return top2[:, 0] - top2[:, 1]


class Entropy(ScoreStrategy):
    """Predictive entropy ``-sum_k p_k log p_k`` (0 log 0 = 0). The most likely class's term is
    ``-(1 - s) log1p(-s)`` with ``s`` the other classes' summed probability, which keeps it
    (about ``s``) where ``p_max`` rounds to 1."""

    name = "entropy"
    outputs = ("probs",)

    def score(self, chunk: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> np.ndarray:
        p = other_classes(chunk["probs"])
        s = p.sum(axis=1)
        return entr(p).sum(axis=1) - (1.0 - s) * np.log1p(-s)
