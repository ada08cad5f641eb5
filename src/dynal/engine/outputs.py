"""What the pool pass can compute: per-sample outputs and labeled-set statistics.

Each per-sample output is a function of a :class:`Chunk` (a batch of pool inputs with a lazily
computed, shared forward pass), the strategy's options for that output, and the
:class:`Context` of the query. Each labeled-set statistic is a function of the model and the
labeled data. Strategies name what they need; the engine computes only that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dynal.engine.param_grads import ParamGradStats, param_grad_sum


@dataclass
class Context:
    """Everything a per-sample output may depend on besides its chunk."""

    model: nn.Module
    stats: dict[str, Any]
    generator: torch.Generator
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # per-query state shared across chunks


class Chunk:
    """A batch of pool inputs; the eval-mode forward pass is computed once, on first use."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model = model
        self.x = x

    @cached_property
    def features(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.features(self.x)

    @cached_property
    def logits(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.head(self.features)

    @cached_property
    def probs(self) -> torch.Tensor:
        return F.softmax(self.logits.double(), dim=1)


def _probs(chunk: Chunk, ctx: Context) -> dict[str, np.ndarray]:
    return {"probs": chunk.probs.numpy()}


def _features(chunk: Chunk, ctx: Context) -> dict[str, np.ndarray]:
    return {"features": chunk.features.numpy()}


def residuals(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``r = p - onehot(label)``: the loss gradient with respect to the logits."""
    r = probs.clone()
    r[torch.arange(len(r)), labels] -= 1.0
    return r


def _last_layer_grad(chunk: Chunk, ctx: Context) -> dict[str, np.ndarray]:
    p = chunk.probs
    return {"r": residuals(p, p.argmax(1)).numpy(), "h": chunk.features.double().numpy()}


def _param_grad_stats(chunk: Chunk, ctx: Context) -> dict[str, np.ndarray]:
    """All-parameter ``||g_u||^2`` and ``<g_u, G_S>`` (options: ``pseudo_label``)."""
    if "param_grad_stats" not in ctx.cache:
        ctx.cache["param_grad_stats"] = ParamGradStats(ctx.model, ctx.stats.get("G_S"))
    opts = ctx.options.get("param_grad_stats", {})
    norm, cross = ctx.cache["param_grad_stats"](chunk.x, pseudo_label=opts.get("pseudo_label", "argmax"))
    return {"grad_norm_sq": norm.numpy(), "grad_dot_labeled": cross.numpy()}


PoolOutput = Callable[[Chunk, Context], dict[str, np.ndarray]]

POOL_OUTPUTS: dict[str, PoolOutput] = {
    "probs": _probs,
    "features": _features,
    "last_layer_grad": _last_layer_grad,
    "param_grad_stats": _param_grad_stats,
}


def last_layer_grad_sum(model: nn.Module, X: np.ndarray, y: np.ndarray, batch_size: int) -> dict[str, Any]:
    """``A = sum_j r_j h_j^T`` (K x d) and ``a = sum_j r_j`` (K) over the labeled set, true labels.

    These give the labeled set's summed last-layer gradient ``G_S = (A, a)``.
    """
    K, d = model.head.out_features, model.head.in_features
    A, a = torch.zeros(K, d, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(X), batch_size):
            chunk = Chunk(model, torch.from_numpy(np.ascontiguousarray(X[i : i + batch_size])))
            r = residuals(chunk.probs, torch.from_numpy(np.asarray(y[i : i + batch_size], dtype=np.int64)))
            A += r.T @ chunk.features.double()
            a += r.sum(0)
    return {"A": A.numpy(), "a": a.numpy()}


LabeledStat = Callable[[nn.Module, np.ndarray, np.ndarray, int], dict[str, Any]]

LABELED_STATS: dict[str, LabeledStat] = {
    "last_layer_grad_sum": last_layer_grad_sum,
    "param_grad_sum": param_grad_sum,
}
