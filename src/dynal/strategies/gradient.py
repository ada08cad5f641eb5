"""dynamicAL (Wang et al., NeurIPS 2022): query the samples that most speed up training.

``score(u) = ||g_u||^2 + train_term * <g_u, G_S>``, with ``g_u`` the loss gradient at the
pseudo-label and ``G_S`` the summed true-label gradient of the labeled set. With
``train_term = 2`` this is ``G(S + {u}) - G(S)``, the gain in training dynamics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dynal.strategies.base import ScoreStrategy


def last_layer_scores(
    r: np.ndarray,
    h: np.ndarray,
    A: np.ndarray | None,
    a: np.ndarray | None,
    bias: bool,
    train_term: float,
) -> np.ndarray:
    """Closed-form last-layer dynamicAL score for residuals ``r`` (N x K) and features ``h`` (N x d).

    ``||g_u||^2 = ||r_u||^2 (||h_u||^2 + 1)`` and ``<g_u, G_S> = r_u^T (A h_u + a)``; the ``+1``
    and ``a`` come from the head's bias and are dropped without one.
    """
    b = 1.0 if bias else 0.0
    score = np.einsum("nk,nk->n", r, r) * (np.einsum("nd,nd->n", h, h) + b)
    if train_term and A is not None:
        score += train_term * np.einsum("nk,nk->n", r, h @ A.T + b * a)
    return score


class DynamicAL(ScoreStrategy):
    """dynamicAL: top-b of the per-sample training-dynamics gain.

    Parameters
    ----------
    params : "last"
        Which parameters the gradients cover. "last" uses the closed form of the final
        linear layer (weights and bias).
    train_term : float
        Weight of the cross term ``<g_u, G_S>``; 2 is the paper's method, 0 is pure
        squared gradient length.
    pseudo_label : "argmax" or "expected"
        "argmax" (the paper) uses the model's most likely class as the unknown label.
        "expected" averages the score over ``y ~ p``: ``E||r||^2 = 1 - ||p||^2`` and the
        cross term vanishes because ``E[r] = 0`` (an EGL-like variant).
    """

    name = "dynamical"

    def __init__(self, params: str = "last", train_term: float = 2.0, pseudo_label: str = "argmax") -> None:
        if params != "last":
            raise ValueError(f"params must be 'last', got {params!r}")
        if pseudo_label not in ("argmax", "expected"):
            raise ValueError(f"pseudo_label must be 'argmax' or 'expected', got {pseudo_label!r}")
        if not np.isfinite(train_term) or train_term < 0:
            raise ValueError(f"train_term must be a finite number >= 0, got {train_term}")
        self.params = params
        self.train_term = float(train_term)
        self.pseudo_label = pseudo_label
        if pseudo_label == "argmax":
            self.outputs = ("last_layer_grad",)
            self.labeled = ("last_layer_grad_sum",) if self.train_term else ()
        else:
            self.outputs = ("probs", "features")

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "train_term": self.train_term, "pseudo_label": self.pseudo_label}

    def score(self, chunk: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> np.ndarray:
        bias = bool(stats["head_bias"])
        if self.pseudo_label == "expected":
            p, h = chunk["probs"], chunk["features"].astype(np.float64)
            return (1.0 - np.einsum("nk,nk->n", p, p)) * (np.einsum("nd,nd->n", h, h) + float(bias))
        return last_layer_scores(chunk["r"], chunk["h"], stats.get("A"), stats.get("a"), bias, self.train_term)
