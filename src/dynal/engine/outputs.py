"""What the pool pass can compute: per-sample outputs and labeled-set statistics.

Each per-sample output is a function of a :class:`Chunk` (a batch of pool inputs with a lazily
computed, shared forward pass), the strategy's options for that output, and the
:class:`Context` of the query. Each labeled-set statistic is a function of the model and the
labeled data. Strategies name what they need; the engine computes only that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dynal.engine.modes import equal_parts, forward_batch, removed_on_exit
from dynal.engine.param_grads import ParamGradStats, check_pseudo_label, param_grad_sum, residuals


@dataclass
class Context:
    """Everything a per-sample output may depend on besides its chunk, for one query: its cache
    keeps per-query state such as a copy of the head's weights, so build a new context after
    the model or the labeled set changes."""

    model: nn.Module
    stats: dict[str, Any]
    generator: torch.Generator
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # per-query state shared across chunks


class Chunk:
    """A batch of pool inputs; the eval-mode forward pass is computed once, on first use.

    With ``sizes`` (a dict shared by the chunks of one pass, such as a query's ``ctx.cache``)
    the forward passes take equal parts of the chunk of at most :func:`forward_batch` samples,
    measured on the first chunk that needs features and kept in ``sizes["forward_batch"]``;
    without it, one pass per chunk.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, sizes: dict[str, Any] | None = None) -> None:
        self.model = model
        self.x = x
        self.sizes = sizes

    def run_features(self) -> torch.Tensor:
        """``model.features`` of the chunk (no autograd), in forward passes of at most the
        measured size (one pass where the features are not a single tensor)."""
        batch = len(self.x)
        if self.sizes is not None:
            if "forward_batch" not in self.sizes:
                self.sizes["forward_batch"] = forward_batch(self.model, self.x)
            batch = self.sizes["forward_batch"]
        with torch.no_grad():
            if len(self.x) <= batch:
                return self.model.features(self.x)
            parts = equal_parts(self.x, batch)
            first = self.model.features(parts[0])
            if not isinstance(first, torch.Tensor):
                return self.model.features(self.x)
            return torch.cat([first, *(self.model.features(xs) for xs in parts[1:])])

    @cached_property
    def features(self) -> torch.Tensor:
        return self.run_features()

    @cached_property
    def logits(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.head(self.features)

    @cached_property
    def probs(self) -> torch.Tensor:
        return F.softmax(self.logits, dim=1, dtype=torch.float64)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy, bfloat16 (which numpy lacks) as float32."""
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _probs(chunk: Chunk, ctx: Context) -> dict[str, np.ndarray]:
    return {"probs": chunk.probs.numpy()}


def _features(chunk: Chunk, ctx: Context) -> dict[str, np.ndarray]:
    return {"features": _numpy(chunk.features)}


def _head_features(chunk: Chunk, ctx: Context) -> dict[str, np.ndarray]:
    """``features`` for strategies built on the last-layer gradient (EGL, BAIT), whose closed
    forms need ``model.head(h) = W h + b`` (see :func:`check_linear_head`)."""
    check_linear_head(chunk)
    return _features(chunk, ctx)


def _plain_head(head: nn.Module) -> bool:
    """An ``nn.Linear`` (not a subclass) without hooks of its own: ``head(h) = W h + b``."""
    return type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)


def head_has_bias(model: nn.Module) -> bool:
    """Whether ``model.head`` has a bias tensor (a head of any form may have none)."""
    return isinstance(getattr(model.head, "bias", None), torch.Tensor)


def check_linear_head(chunk: Chunk) -> None:
    """Raise unless the chunk's logits are ``W h + b`` of its features: the last-layer gradient's
    closed forms hold for that head only. Only a head that is not a plain ``nn.Linear`` (a
    subclass, or one with hooks) is checked, by recomputing the product."""
    head = chunk.model.head
    if _plain_head(head):
        return
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    z = chunk.logits
    if isinstance(weight, torch.Tensor) and weight.shape == (z.shape[1], chunk.features.shape[1]):
        with torch.no_grad():
            linear = F.linear(chunk.features, weight, bias if isinstance(bias, torch.Tensor) else None)
        if torch.allclose(z, linear, rtol=1e-4, atol=1e-5 * float(linear.abs().max()) + 1e-30):
            return
    raise _not_linear(head)


def _not_linear(head: nn.Module) -> ValueError:
    return ValueError(
        f"the last-layer gradient needs model.head(features) = W h + b, and model.head ({type(head).__name__}) "
        "computes something else (its own forward, or a hook that changes its input or output); "
        "of dynal's strategies only dynamicAL with params='all' differentiates any head"
    )


def _last_layer_grad(chunk: Chunk, ctx: Context) -> dict[str, np.ndarray]:
    check_linear_head(chunk)
    p = chunk.probs
    return {"r": residuals(p, p.argmax(1)).numpy(), "h": chunk.features.double().numpy()}


def _pseudo_label(ctx: Context, output: str) -> str:
    return check_pseudo_label(ctx.options.get(output, {}).get("pseudo_label", "argmax"))


def _head_and_cross(chunk: Chunk, ctx: Context, bias: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Float64 logits ``z`` and ``c = A h + a`` (``None`` without the labeled sums ``A``, ``a``),
    each K x n, one column per sample.

    A plain ``nn.Linear`` head (no hooks) on float32 or float64 features computes both in one
    product with ``[W; A]``, which costs what the head alone does; its logits then serve the
    chunk's other outputs. Half-precision features take the head's own logits and ``A h`` in
    float32, whose sums over a large labeled set overflow float16. Rows of ``A`` below ``2^-64``
    (a labeled set the model is sure of to a logit margin of about 45 or more) are scaled by a
    power of two into float32's range for the product and back in float64, so that they do not
    flush to zero.
    """
    if "A" not in ctx.stats:
        return chunk.logits.double().numpy().T, None
    h, head = chunk.features, ctx.model.head
    if "last_layer_head" not in ctx.cache:
        wide = torch.promote_types(h.dtype, torch.float32)
        A64 = np.asarray(ctx.stats["A"], dtype=np.float64)
        top = np.abs(A64).max(1, initial=0.0)
        small = (top > 0) & (top < 2.0**-64)
        scale = None
        if small.any():  # powers of two: exact both ways
            scale = np.exp2(np.floor(np.log2(np.where(small, top, 1.0))))[:, None]
        A = torch.from_numpy(A64 if scale is None else A64 / scale).to(wide).contiguous()  # K x d, as the head's weight
        fused = None
        if _plain_head(head) and h.dtype == wide:
            b = head.bias.detach() if head.bias is not None else torch.zeros(len(A), dtype=h.dtype)
            fused = (torch.cat([b, torch.zeros(len(A), dtype=h.dtype)])[:, None], torch.cat([head.weight.detach(), A]))
        ctx.cache["last_layer_head"] = (A, fused, bias * ctx.stats["a"][:, None], scale)
    A, fused, a, scale = ctx.cache["last_layer_head"]
    if fused is not None and "logits" not in chunk.__dict__:
        out = torch.addmm(*fused, h.T)
        K = len(A)
        chunk.logits = out[:K].T  # the chunk's cached forward pass, as ``head(features)``
        out = out.numpy().astype(np.float64)
        z, c = out[:K], out[K:]
    else:
        z = chunk.logits.double().numpy().T
        c = A.matmul(h.to(A.dtype).T).numpy().astype(np.float64)
    if scale is not None:
        c *= scale
    c += a
    return z, c


def _last_layer_stats(chunk: Chunk, ctx: Context) -> dict[str, np.ndarray]:
    """Last-layer ``||g_u||^2`` and ``<g_u, G_S>`` in closed form (options: ``pseudo_label``).

    ``||g_u||^2 = ||r_u||^2 (||h_u||^2 + 1)`` and ``<g_u, G_S> = r_u^T (A h_u + a)``, without the
    ``+ 1`` and ``a`` when the head has no bias; ``<g_u, G_S>`` is zero when the labeled-set sums
    ``A``, ``a`` were not computed. ``r = p - e_y`` is never formed: with ``e_k = exp(z_k - z_y)``
    for ``k != y`` (0 at the argmax ``y``), ``q = sum_k e_k`` and ``p = e / (1 + q)`` off ``y``,
    ``||r||^2 = (q^2 + ||e||^2) / (1 + q)^2`` and ``r^T c = (e^T c - q c_y) / (1 + q)``, which
    have no cancellation however confident the model is. The d-long products (``||h_u||^2``,
    ``A h_u``) run in the features' own precision (float32 for the builtin models; ``A h_u`` in
    float32 at least), the rest in float64. With ``"expected"`` both are averaged over
    ``y ~ p``: ``||r||^2`` becomes ``1 - ||p||^2 = (2 q + q^2 - ||e||^2) / (1 + q)^2`` (the same
    ``e``, ``q``; no cancellation either, since ``||e||^2 <= q^2``) and the cross term vanishes
    (``E[r] = 0``).
    """
    check_linear_head(chunk)
    h = chunk.features
    bias = float(head_has_bias(ctx.model))
    h_sq = _numpy(torch.linalg.vector_norm(h, dim=1)).astype(np.float64) ** 2 + bias
    expected = _pseudo_label(ctx, "last_layer_stats") == "expected"
    z, c = (chunk.logits.double().numpy().T, None) if expected else _head_and_cross(chunk, ctx, bias)
    y, cols = z.argmax(0), np.arange(z.shape[1])
    e = np.exp(z - z[y, cols])
    e[y, cols] = 0.0
    q = e.sum(0)
    inv = 1.0 / (1.0 + q)
    e_sq = (e * e).sum(0)
    if expected:
        return {"grad_norm_sq": (2.0 * q + q * q - e_sq) * (inv * inv * h_sq), "grad_dot_labeled": np.zeros(len(q))}
    norm = (q * q + e_sq) * (inv * inv * h_sq)
    cross = ((e * c).sum(0) - q * c[y, cols]) * inv if c is not None else np.zeros(len(q))
    return {"grad_norm_sq": norm, "grad_dot_labeled": cross}


def _param_grad_stats(chunk: Chunk, ctx: Context) -> dict[str, np.ndarray]:
    """All-parameter ``||g_u||^2`` and ``<g_u, G_S>`` (options: ``pseudo_label``)."""
    if "param_grad_stats" not in ctx.cache:
        ctx.cache["param_grad_stats"] = ParamGradStats(ctx.model, ctx.stats.get("G_S"), ctx.stats.get("forward_batch"))
    norm, cross = ctx.cache["param_grad_stats"](chunk.x, pseudo_label=_pseudo_label(ctx, "param_grad_stats"))
    return {"grad_norm_sq": norm.numpy(), "grad_dot_labeled": cross.numpy()}


# Dropout layers MC dropout can drive: elementwise (nn.Dropout) or channelwise (DropoutNd).
_MC_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """The model's dropout layers with ``p > 0``; a clear error when MC dropout cannot run."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    unsupported = sorted({type(m).__name__ for m in layers if not isinstance(m, _MC_DROPOUT)})
    if unsupported:
        raise ValueError(f"MC dropout supports nn.Dropout and nn.Dropout1d/2d/3d, not {unsupported}")
    if not layers:
        raise ValueError(
            f"MC dropout needs a model with nn.Dropout layers (p > 0), and {type(model).__name__} has none: "
            "build a builtin model with its `dropout` option, e.g. model_factory('mlp', ..., dropout=0.3) "
            "or `dropout = 0.3` in the config's [model] table"
        )
    return layers


def _mask_hook(masks: dict[tuple[int, int], torch.Tensor], key: tuple[int, int], generator: torch.Generator) -> Callable:
    """Forward hook multiplying an eval-mode (identity) dropout layer's output by the pass's mask."""

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if key not in masks:
            # One mask per unit (nn.Dropout) or per channel (DropoutNd), shared by every sample.
            shape = output.shape[1:] if isinstance(module, nn.Dropout) else output.shape[1:2] + (1,) * (output.ndim - 2)
            keep = torch.rand(shape, generator=generator) >= module.p
            masks[key] = keep.to(output.dtype) / (1.0 - module.p) if module.p < 1 else torch.zeros(shape, dtype=output.dtype)
        return output * masks[key]

    return hook


def _mc_probs(chunk: Chunk, ctx: Context) -> dict[str, np.ndarray]:
    """MC-dropout class probabilities ``mc_probs`` (n x passes x K); options: ``passes`` (20).

    Pass ``t`` is one draw ``theta_t ~ q(theta)`` of the dropout posterior: one mask per unit,
    drawn from ``ctx.generator`` on first use and shared by every pool sample. So a sample's
    probabilities depend on its input only, not on its chunk or pool position, and all samples
    see the same ``passes`` posterior draws. The model stays in eval mode (BatchNorm uses its
    running statistics and is never updated); the masks are applied by forward hooks on the
    dropout layers, which are removed after each pass. Torch's global RNG is not used.
    """
    passes = int(ctx.options.get("mc_probs", {}).get("passes", 20))
    layers = dropout_layers(ctx.model)
    masks = ctx.cache.setdefault("mc_masks", {})
    out = []
    for t in range(passes):
        handles = [m.register_forward_hook(_mask_hook(masks, (t, j), ctx.generator)) for j, m in enumerate(layers)]
        with removed_on_exit(handles), torch.no_grad():
            logits = ctx.model.head(chunk.run_features())
        out.append(F.softmax(logits.double(), dim=1))
    return {"mc_probs": torch.stack(out, dim=1).numpy()}


PoolOutput = Callable[[Chunk, Context], dict[str, np.ndarray]]

POOL_OUTPUTS: dict[str, PoolOutput] = {
    "probs": _probs,
    "features": _features,
    "head_features": _head_features,
    "last_layer_grad": _last_layer_grad,
    "last_layer_stats": _last_layer_stats,
    "param_grad_stats": _param_grad_stats,
    "mc_probs": _mc_probs,
}


def _chunks(model: nn.Module, X: np.ndarray, batch_size: int) -> Iterator[tuple[int, Chunk]]:
    """The labeled set in chunks of ``batch_size`` rows (first row, chunk), sized as the pool's."""
    sizes: dict[str, Any] = {}
    for i in range(0, len(X), batch_size):
        yield i, Chunk(model, torch.from_numpy(np.ascontiguousarray(X[i : i + batch_size])), sizes)


def last_layer_grad_sum(model: nn.Module, X: np.ndarray, y: np.ndarray, batch_size: int) -> dict[str, Any]:
    """``A = sum_j r_j h_j^T`` (K x d) and ``a = sum_j r_j`` (K) over the labeled set, true labels.

    These give the labeled set's summed last-layer gradient ``G_S = (A, a)``.
    """
    weight = getattr(model.head, "weight", None)  # W of a head computing W h (+ b), checked per chunk
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise _not_linear(model.head)
    A, a = torch.zeros(*weight.shape, dtype=torch.float64), torch.zeros(len(weight), dtype=torch.float64)
    with torch.no_grad():
        for i, chunk in _chunks(model, X, batch_size):
            check_linear_head(chunk)
            r = residuals(chunk.probs, torch.from_numpy(np.asarray(y[i : i + batch_size], dtype=np.int64)))
            A += r.T @ chunk.features.double()
            a += r.sum(0)
    return {"A": A.numpy(), "a": a.numpy()}


def labeled_outputs(model: nn.Module, X: np.ndarray, y: np.ndarray, batch_size: int) -> dict[str, Any]:
    """Penultimate features ``labeled_features`` (L x d) and eval-mode ``labeled_probs`` (L x K).

    Compact per-sample arrays of the labeled set: Coreset's initial centres, BAIT's labeled
    Fisher information (which BAIT forms itself, full or diagonal). Labels are not used.
    """
    chunks = [chunk for _, chunk in _chunks(model, X, batch_size)]
    if not chunks:  # an empty labeled set: the widths from a pass on no samples (any head)
        chunks = [Chunk(model, torch.from_numpy(np.ascontiguousarray(X[:0])))]
    return {
        "labeled_features": np.concatenate([_numpy(chunk.features) for chunk in chunks]),
        "labeled_probs": np.concatenate([chunk.probs.numpy() for chunk in chunks]),
    }


LabeledStat = Callable[[nn.Module, np.ndarray, np.ndarray, int], dict[str, Any]]

LABELED_STATS: dict[str, LabeledStat] = {
    "last_layer_grad_sum": last_layer_grad_sum,
    "param_grad_sum": param_grad_sum,
    "labeled_outputs": labeled_outputs,
}
