"""dynamicAL (Wang et al., NeurIPS 2022): query the samples that most speed up training.

``score(u) = ||g_u||^2 + train_term * <g_u, G_S>``, with ``g_u`` the loss gradient at the
pseudo-label and ``G_S`` the summed true-label gradient of the labeled set. With
``train_term = 2`` this is ``G(S + {u}) - G(S)``, the gain in training dynamics.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from dynal.engine.param_grads import check_pseudo_label
from dynal.engine.topk import draw_salt, tie_keys
from dynal.objective import greedy, marginal_gains, set_value, top_b
from dynal.strategies.base import Chunks, ScoreStrategy, Strategy
from dynal.strategies.collect import gather


class DynamicAL(ScoreStrategy):
    """dynamicAL: top-b of the per-sample training-dynamics gain.

    Parameters
    ----------
    params : "last" or "all"
        Which parameters the gradients cover. "last" uses the closed form of the final
        linear layer (weights and bias): one forward pass. "all" covers every trainable
        parameter, as the paper's authors ran it: one forward and one backward pass per chunk,
        with per-layer per-sample gradient statistics (see ``dynal.engine.param_grads``).
    train_term : float
        Weight of the cross term ``<g_u, G_S>``; 2 is the paper's method, 0 is pure
        squared gradient length.
    pseudo_label : "argmax" or "expected"
        "argmax" (the paper) uses the model's most likely class as the unknown label.
        "expected" averages the score over ``y ~ p`` (an EGL-like variant): the cross term
        vanishes because ``E[r] = 0``; for "last" ``E||r||^2 = 1 - ||p||^2``, for "all" the
        norm costs K backward passes.
    """

    name = "dynamical"

    def __init__(self, params: str = "last", train_term: float = 2.0, pseudo_label: str = "argmax") -> None:
        if params not in ("last", "all"):
            raise ValueError(f"params must be 'last' or 'all', got {params!r}")
        check_pseudo_label(pseudo_label)
        if isinstance(train_term, bool) or not isinstance(train_term, numbers.Real) or not np.isfinite(train_term) or train_term < 0:
            raise ValueError(f"train_term must be a finite number >= 0, got {train_term!r}")
        self.params = params
        self.train_term = float(train_term)
        self.pseudo_label = pseudo_label
        cross = self.train_term != 0 and pseudo_label == "argmax"
        if params == "all":
            self.outputs = ("param_grad_stats",)
            self.labeled = ("param_grad_sum",) if cross else ()
        else:
            self.outputs = ("last_layer_stats",)
            self.labeled = ("last_layer_grad_sum",) if cross else ()

    def output_options(self) -> dict[str, dict[str, Any]]:
        return {self.outputs[0]: {"pseudo_label": self.pseudo_label}}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "train_term": self.train_term, "pseudo_label": self.pseudo_label}

    def score(self, chunk: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> np.ndarray:
        return chunk["grad_norm_sq"] + self.train_term * chunk["grad_dot_labeled"]


class DynamicALGreedy(Strategy):
    """dynamicAL without the subset approximation: greedy maximization of the exact set
    objective ``G(S + Q) = ||G_S + sum_{u in Q} g_u||^2`` on the last layer.

    Each step adds the sample with the largest marginal gain ``||g_u||^2 + 2 <R, g_u>``
    (``R`` = ``G_S`` plus the gradients chosen so far), updating all gains with the factorized
    inner product ``(r_u^T r_v)(h_u^T h_v + 1)``: O(b N (K + d)) time, O(N (K + d)) memory.
    Greedy can lose to plain top-b on this objective, so the query is whichever of the two
    sets has the larger exact value (scores are the marginal gains of the returned set).
    """

    name = "dynamical-greedy"
    outputs = ("last_layer_grad",)
    labeled = ("last_layer_grad_sum",)

    def select(self, chunks: Chunks, stats: Mapping[str, Any], budget: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ids, pool = gather(chunks, ["r", "h"])
        r, h, A, a, bias = pool["r"], pool["h"], stats["A"], stats["a"], bool(stats["head_bias"])
        keys = tie_keys(ids, draw_salt(rng))
        rows, gains = greedy(r, h, A, a, bias, budget, keys)
        top = top_b(r, h, A, a, bias, budget, keys)
        if set_value(r, h, A, a, bias, top) > set_value(r, h, A, a, bias, rows):
            rows, gains = top, marginal_gains(r, h, A, a, bias, top)
        return ids[rows], gains
