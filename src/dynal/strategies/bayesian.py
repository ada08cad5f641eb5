"""BALD with MC dropout (Houlsby et al. 2011; Gal, Islam & Ghahramani, ICML 2017)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.special import entr

from dynal.strategies.base import ScoreStrategy
from dynal.validation import is_integer


def mutual_information(mc_probs: np.ndarray) -> np.ndarray:
    """BALD's ``I(y; theta | x) = H[mean_t p_t] - mean_t H[p_t]`` for (n x T x K) MC probabilities.

    Entropies use ``entr`` (``0 log 0 = 0``), so no ``log(0)`` is ever taken. A difference within
    rounding of 0 (at most ``1e-12`` of ``H[mean_t p_t]``, or below 0, which the exact value never
    is) is 0, so that samples without information tie and the tie keys order them.
    """
    total = entr(mc_probs.mean(axis=1)).sum(axis=1)
    mi = total - entr(mc_probs).sum(axis=2).mean(axis=1)
    return np.where(mi <= 1e-12 * total, 0.0, mi)  # a NaN stays NaN, for the top-b to refuse


class BALD(ScoreStrategy):
    """BALD: top-b of the mutual information between the label and the weights, by MC dropout.

    Parameters
    ----------
    passes : int
        Stochastic forward passes T (default 20). Each pass applies one dropout mask per unit,
        drawn from the query's generator and shared by all pool samples (one posterior draw);
        only the dropout layers act, BatchNorm keeps its running statistics. The model must
        have dropout layers (the builtin models' ``dropout`` option).

    A query costs T forward passes over the pool; memory is O(b) plus one chunk's T×K
    probabilities.
    """

    name = "bald"
    outputs = ("mc_probs",)

    def __init__(self, passes: int = 20) -> None:
        if not is_integer(passes) or passes < 2:
            raise ValueError(f"passes must be an integer >= 2, got {passes!r}")
        self.passes = int(passes)

    def output_options(self) -> dict[str, dict[str, Any]]:
        return {"mc_probs": {"passes": self.passes}}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "passes": self.passes}

    def score(self, chunk: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> np.ndarray:
        return mutual_information(chunk["mc_probs"])
