"""Per-sample gradient statistics over all trainable parameters, never materializing a
per-sample gradient of the whole network.

For a batch of pool samples and, per sample, a fixed logit-gradient ``r`` (``p - e_y`` for the
cross-entropy loss at label ``y``), this computes

- ``||g_u||^2``, the squared norm of the per-sample parameter gradient, and
- ``<g_u, G>`` for a fixed parameter-space vector ``G`` (the labeled set's summed gradient),

from one forward pass and one backward pass to the layer outputs. Each covered layer's
per-sample gradient is built from its input and its output gradient, reduced to the two
numbers above and discarded, so memory is one layer of one sub-chunk at a time:

- ``nn.Linear`` on (N, d) inputs: ``g = delta a^T``, so ``||g||^2 = ||a||^2 ||delta||^2`` and
  ``<g, G_W> = delta^T G_W a`` (bias: ``delta``); on sequences, ``g = sum_t delta_t a_t^T`` over
  the positions, with the samples on any axis before the features (sequence-first models too),
  as for ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.Embedding`` below.
- ``nn.Conv2d``: ``g = sum_p delta_p u_p^T`` over output positions ``p`` with ``u_p`` the
  unfolded input patch, per group of channels (grouped and depthwise convolutions too).
- ``nn.Conv1d`` as a ``Conv2d`` of height one, ``nn.Conv3d`` alike; string paddings and padding
  modes other than zeros as the padded input the layer convolves.
- ``nn.BatchNorm1d/2d/3d`` in eval mode: ``g_gamma = sum delta * xhat`` and ``g_beta = sum delta``
  over the positions, with ``xhat`` normalized by the running statistics; exact per sample (the
  official code's chunk-mean shortcut is not used). ``nn.LayerNorm``, ``nn.RMSNorm``,
  ``nn.GroupNorm`` and ``nn.InstanceNorm1d/2d/3d`` alike, with ``xhat`` the layer's own
  normalization of the sample's input (or running statistics, as in BatchNorm).
- ``nn.Embedding``: ``g`` has one row per distinct token of the sample, the sum of the output
  gradients at that token's positions (none for ``padding_idx``); ``nn.EmbeddingBag`` alike,
  with the bag's output gradient (divided by its size for "mean") at each position.
- ``nn.PReLU``: ``g = sum delta * min(a, 0)`` over each channel's positions.

- ``nn.MultiheadAttention``: its four projections as ``nn.Linear`` on a sequence, their inputs
  and output gradients exposed by recomputing the attention in the pass; ``nn.RNN``, ``nn.GRU``
  and ``nn.LSTM`` alike, each layer's input projection a ``Linear`` on the sequence and its hidden
  projection one on the steps' previous states (see :func:`_record_closed_forms`).

Parameters of any other layer fall back to ``torch.func`` (``vmap`` over ``grad``), with a
warning naming the layer: on their own module alone where it can be (its recorded call replayed
on each sample against its recorded output gradient, so a user-defined layer costs about one
more pass of that module), else on the whole model, and one sample at a time where torch.func
cannot run them; so do covered layers that turn out, while the model runs, not to follow their
formula (see :class:`ParamGradStats`).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.utils.checkpoint import CheckpointError
from torch.utils._pytree import tree_flatten, tree_unflatten

from dynal.engine.modes import equal_parts, eval_mode, forward_batch, removed_on_exit

# Largest per-sample-gradient block built at once for one layer, in elements (256 MB of float32).
_BLOCK_ELEMENTS = 1 << 26
# Convolutional models are scored in sub-batches whose largest per-sample weight-gradient block
# is about 2 MB of float32 (at least 16 samples). Measured on ResNet-18 against whole chunks of
# 64: the same speed or better, at a tenth of the peak memory (31 MB against 300-600 MB).
_CACHE_ELEMENTS = 1 << 19


def _covered(module: nn.Module) -> bool:
    """Whether the fast path computes this module's per-sample gradients exactly: a plain
    ``Linear``, ``Conv1d``/``Conv2d``/``Conv3d`` (any padding, padding mode and groups), eval-mode
    ``BatchNorm1d/2d/3d`` (running statistics), ``LayerNorm``, ``RMSNorm``, ``GroupNorm``,
    ``InstanceNorm1d/2d/3d`` (affine), ``Embedding`` (no ``max_norm``), ``EmbeddingBag``
    (no ``max_norm``, sum or mean, one bag per sample: 2-D input) or ``PReLU`` whose only parameters
    are its own ``weight`` and ``bias``, used as they are (no parametrization); not
    ``nn.MultiheadAttention``'s ``out_proj``, whose weight the attention uses without calling it."""
    cls = _fast_class(module)
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):  # MultiheadAttention's out_proj, never called
        return False
    if cls is None or any(getattr(type(module), f) is not getattr(cls, f) for f in _FAST[cls][1]):
        return False
    names = {n for n, _ in module.named_parameters(recurse=False)}
    if "weight" not in names or not names <= {"weight", "bias"} or parametrize.is_parametrized(module):
        return False
    if issubclass(cls, nn.modules.batchnorm._BatchNorm):
        return module.affine and module.track_running_stats and module.running_var is not None
    if issubclass(cls, nn.modules.instancenorm._InstanceNorm):
        return module.affine
    if cls is nn.Embedding:
        return module.max_norm is None  # max_norm rescales rows of the weight in place
    if cls is nn.EmbeddingBag:
        return module.max_norm is None and module.mode in ("sum", "mean")
    return True


def check_per_sample(model: nn.Module) -> None:
    """Raise when a sample's eval-mode output depends on the rest of its batch (BatchNorm without
    running statistics normalizes with the batch's own, so no per-sample gradient exists), when
    a trainable embedding scales its gradient by the batch's token counts
    (``scale_grad_by_freq``, so the labeled set's summed gradient would depend on its batches),
    or when a trainable parameter has a gradient hook (``Tensor.register_hook``), which would
    change the labeled set's summed gradient but has no per-sample meaning."""
    hooked = [n for n, p in model.named_parameters() if p.requires_grad and p._backward_hooks]
    if hooked:
        raise ValueError(
            f"params='all' takes per-sample loss gradients, but the parameter(s) {', '.join(hooked)} have gradient "
            "hooks (Tensor.register_hook), which would change the labeled-set gradient G_S and not the per-sample "
            "ones; remove the hooks (keep their handles) while dynamicAL scores the pool"
        )
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq and m.weight.requires_grad:
            raise ValueError(
                f"params='all' sums per-sample gradients, but {name or 'the model'} ({type(m).__name__}) has "
                "scale_grad_by_freq=True, which divides each token's gradient by its count in the whole batch, "
                "so the labeled set's summed gradient would depend on how it is batched; build it with "
                "scale_grad_by_freq=False (or freeze it) to score with params='all'"
            )
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise ValueError(
                f"params='all' takes each sample's own gradient, but {name or 'the model'} ({type(m).__name__}) "
                "has no running statistics (track_running_stats=False), so in eval mode it normalizes with "
                "the statistics of the batch and a sample's gradient depends on its batch; build it with "
                "track_running_stats=True"
            )


# Layers whose bias gradient is the output gradient summed over the positions, with the bias on
# the output's last axes or on axis 1: one of them whose only trainable parameter is its bias
# (bias-only fine-tuning) keeps the fast path with :func:`_bias_stats`.
_BIAS_LAST = (nn.Linear, nn.LayerNorm)
_BIAS_CHANNELS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """A module's own trainable parameters, by name."""
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def _bias_only(module: nn.Module) -> bool:
    """Whether the module's only trainable parameter is a bias that :func:`_bias_stats` reads."""
    return isinstance(module, _BIAS_LAST + _BIAS_CHANNELS) and [n for n, _ in _trainable(module)] == ["bias"]


def split_parameters(model: nn.Module, exclude: Collection[str] = ()) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """Covered modules (with trainable parameters) and the names of all other trainable parameters.

    A module is covered when :func:`_covered` holds, all its parameters are trainable (or only its
    bias, see :func:`_bias_only`), none is shared with another module (tied weights) and its
    name is not in ``exclude``. Other parameters are named as ``model.named_parameters()`` names
    them (a tied one once).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    uses = Counter(id(p) for _, m in model.named_modules(remove_duplicate=False) for p in m.parameters(recurse=False))
    covered, other = [], {}
    for mname, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        trainable = [p for _, p in _trainable(module)]
        if not trainable:
            continue
        whole = len(trainable) == len(own) or _bias_only(module)
        if mname not in exclude and _covered(module) and whole and all(uses[id(p)] == 1 for p in own):
            covered.append((mname, module))
        else:
            other.update((names[id(p)], None) for p in trainable)
    return covered, list(other)


def param_grad_sum(model: nn.Module, X: np.ndarray, y: np.ndarray, batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """``G_S``: the labeled set's summed true-label loss gradient over all trainable parameters.

    Computed in eval mode in mini-batches with sum reduction (the same vector as a loop over
    single samples), of at most ``batch_size`` samples and at most as many as keep the largest
    layer output near 8 MB (see :func:`dynal.engine.modes.forward_batch`), so the autograd
    graph's memory is bounded by the model; also under ``torch.no_grad`` or
    ``torch.inference_mode``. Returned as ``{"G_S": {parameter name: tensor}}``, with the
    measured ``forward_batch`` for the pool's passes (see :class:`ParamGradStats`) when ``X``
    is not empty.
    """
    check_per_sample(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    measured = {}
    if len(X):
        measured["forward_batch"] = forward_batch(model, torch.from_numpy(np.ascontiguousarray(X[:batch_size])), run=model)
        batch_size = min(batch_size, measured["forward_batch"])
    with torch.inference_mode(False):
        total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        for i in range(0, len(X), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(X[i : i + batch_size]))
            t = torch.from_numpy(np.asarray(y[i : i + batch_size], dtype=np.int64))
            with torch.enable_grad(), eval_mode(model):
                loss = F.cross_entropy(model(x), t, reduction="sum")
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:  # None: a parameter the forward pass does not use
                    total[n] += g.double()
        return {"G_S": {n: g.to(params[n].dtype) for n, g in total.items()}, **measured}


def check_pseudo_label(mode: str) -> str:
    """``mode`` if it names a pseudo-label rule (``"argmax"`` or ``"expected"``), else a clear error."""
    if mode not in ("argmax", "expected"):
        raise ValueError(f"pseudo_label must be 'argmax' or 'expected', got {mode!r}")
    return mode


def residuals(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``r = p - onehot(label)``, the cross-entropy gradient with respect to the logits, with
    ``r_y = -sum_{k != y} p_k`` so that no digits cancel when ``p_y`` is close to 1."""
    rows = torch.arange(len(probs))
    r = probs.clone()
    r[rows, labels] = 0.0
    r[rows, labels] = -r.sum(1)
    return r


def _one_sample_grads(loss: Callable[[int], torch.Tensor], n: int, params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The gradient of ``loss(i)`` with respect to each of ``params`` for ``i < n``, one at a time
    (zeros for a parameter that ``loss(i)`` does not use)."""
    rows = []
    for i in range(n):
        with torch.enable_grad():
            grads = torch.autograd.grad(loss(i), list(params), allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g for g, p in zip(grads, params)])
    return rows


def _single_sample_grads(model: nn.Module, x: torch.Tensor, r: torch.Tensor, params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``J_u^T r_u`` for each sample ``u`` of ``x`` and each of ``params``, one sample at a time
    (zeros for a parameter the pass does not use): the obviously correct, slow reference."""
    return _one_sample_grads(lambda i: (model(x[i : i + 1])[0] * r[i]).sum(), len(x), params)


def _grad_stats(g: dict[str, torch.Tensor], G: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm and cross term (float64) from materialized per-sample gradients ``{name: (n, ...)}``,
    summed in at least float32, which a float16 layer's gradients do not overflow."""
    wide = {k: torch.promote_types(v.dtype, torch.float32) for k, v in g.items()}
    rows = {k: v.reshape(len(v), -1) for k, v in g.items()}  # a 0-dim parameter's gradients are (n,)
    norm = sum(torch.linalg.vector_norm(v, dim=1, dtype=wide[k]).square() for k, v in rows.items()).double()
    if G is None:
        return norm, torch.zeros_like(norm)
    cross = sum(v.to(wide[k]) @ G[k].flatten().to(wide[k]) for k, v in rows.items()).double()
    return norm, cross


def _parameter_vector(model: nn.Module, G: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``G`` checked to hold one tensor per trainable parameter, of its shape, and cast to its
    dtype (as :func:`param_grad_sum` gives it)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name not in G:
            raise ValueError(f"G has no entry for the trainable parameter {name!r}")
        g = torch.as_tensor(G[name])
        if g.shape != p.shape:
            raise ValueError(f"G[{name!r}] has shape {tuple(g.shape)}, but the parameter has shape {tuple(p.shape)}")
        out[name] = g.detach().to(p.dtype)
    return out


@contextmanager
def _record_layers(modules: Sequence[nn.Module], clone: bool) -> Iterator[list[list]]:
    """Record each module's input (detached), output (attached) and the output's version.

    With ``clone``, later layers get a copy of each output, so in-place operations downstream
    (such as ``ReLU(inplace=True)``) cannot rewrite the recorded tensor.
    """
    records: list[list] = [[] for _ in modules]

    def hook(i: int):
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            inp = args[0] if args else kwargs["input"]
            # the statistics read only ``input``: other tensors (an EmbeddingBag's offsets or
            # per_sample_weights) are recorded as a missing input, which demotes the layer
            extra = any(isinstance(v, torch.Tensor) and v is not inp for v in (*args[1:], *kwargs.values()))
            records[i] += [None if extra else inp.detach(), output, output._version]
            return output.clone() if clone else None

        return fn

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    with removed_on_exit(handles):
        yield records


@contextmanager
def _record_calls(modules: Sequence[nn.Module], clone: bool) -> Iterator[list[list[SimpleNamespace]]]:
    """Record every call of each module: its arguments as a flat list of leaves with their tree
    (tensors detached, or copied with ``clone``); its tensor outputs as aliases that later code
    gets instead, so that an output's gradient is only what reaches it from outside the module
    (not also through another output the module computed from it); whether the call changed its
    own arguments in place; and each recorded tensor with its version, so that an in-place
    change after the call shows. With ``clone``, later code gets a copy of each alias."""
    calls: list[list[SimpleNamespace]] = [[] for _ in modules]
    pending: list[list[list[tuple[torch.Tensor, int]]]] = [[] for _ in modules]  # per module, per open call

    def pre_hook(i: int):
        def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
            pending[i].append([(t, t._version) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)])

        return fn

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, kwargs: dict, output):
            changed = any(t._version != v for t, v in pending[i].pop())
            leaves, tree = tree_flatten((args, kwargs))
            kept = [(t.detach().clone() if clone else t.detach()) if isinstance(t, torch.Tensor) else t for t in leaves]
            flat, spec = tree_flatten(output)
            arguments = {id(t) for t in leaves if isinstance(t, torch.Tensor)}
            swap: dict[int, torch.Tensor] = {}  # one alias (or copy) per distinct output object, so `is` holds as before
            for t in flat:
                # an argument returned as it is (it holds none of the module's parameters), an
                # output without a gradient (made under no_grad) or one that has no views (sparse)
                # stays itself
                aliased = t.requires_grad and t.layout == torch.strided and not t.is_nested and id(t) not in arguments if isinstance(t, torch.Tensor) else False
                if aliased and id(t) not in swap:
                    swap[id(t)] = t.view_as(t)
            flat = [swap.get(id(t), t) for t in flat]
            outputs = [t for t in flat if isinstance(t, torch.Tensor)]
            first = [all(u is not t for u in outputs[:k]) for k, t in enumerate(outputs)]  # a repeat gets no cotangent
            watched = [t for t in leaves if isinstance(t, torch.Tensor)] + outputs
            # whether each output had a gradient when made: one made under no_grad and later
            # changed in place by a product with a parameter gets one, which is not the module's
            grads = [t.requires_grad for t in outputs]
            calls[i].append(SimpleNamespace(leaves=kept, tree=tree, outputs=outputs, first=first, grads=grads, changed_input=changed, versions=[(t, t._version) for t in watched]))
            if not clone:
                return tree_unflatten(flat, spec)
            copies = {id(a): a.clone() for a in swap.values()}  # the aliases; the other outputs keep their identity
            return tree_unflatten([copies.get(id(t), t) for t in flat], spec)

        return fn

    handles = [m.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    handles += [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    with removed_on_exit(handles):
        yield calls


def _sample_axes(t: object, u: object, n: int, m: int) -> list[int]:
    """The axes of ``t``, recorded on a batch of ``n`` samples, whose length follows the number
    of samples: ``n`` in ``t`` and ``m`` in ``u``, the same tensor recorded on a probe of ``m``."""
    if not isinstance(t, torch.Tensor) or not isinstance(u, torch.Tensor) or t.dim() != u.dim():
        return []
    return [k for k in range(t.dim()) if t.shape[k] == n and u.shape[k] == m]


def _layer_sample_axes(rec: list, seen: list, n: int, m: int) -> list[int]:
    """The axes of a covered layer's input and output, as :func:`_record_layers` recorded them on
    a batch of ``n`` samples (``rec``) and on a probe of ``m`` (``seen``), that follow the number of
    samples; none unless it ran once on each with its input alone."""
    if not _ran_once_alone(rec, seen):
        return []
    outputs = _sample_axes(rec[1], seen[1], n, m)
    return [k for k in _sample_axes(rec[0], seen[0], n, m) if k in outputs]


def _ran_once_alone(rec: list, seen: list) -> bool:
    """Whether a covered layer ran once, on its input alone, both on the batch (``rec``, as
    :func:`_record_layers` records it) and on the probe (``seen``)."""
    return len(rec) == 3 and len(seen) == 3 and rec[0] is not None and seen[0] is not None


def _same_layout(rec: list, seen: list) -> bool:
    """Whether a covered layer ran once, on its input alone, both on the batch (``rec``) and on
    the probe (``seen``), with inputs and outputs of the same number of axes each time."""
    return _ran_once_alone(rec, seen) and rec[0].dim() == seen[0].dim() and rec[1].dim() == seen[1].dim()


def _call_sample_axes(calls: list[SimpleNamespace], seen: list[SimpleNamespace], n: int, m: int) -> list[list[int]] | None:
    """Per argument, then per output, of a module's one recorded call, the axes that follow the
    number of samples (see :func:`_layer_sample_axes`); ``None`` unless it ran once on each, the
    same way, without changing its arguments in place."""
    if len(calls) != 1 or len(seen) != 1 or calls[0].changed_input or seen[0].changed_input:
        return None
    call, probe = calls[0], seen[0]
    if len(probe.leaves) != len(call.leaves) or len(probe.outputs) != len(call.outputs):
        return None
    return [_sample_axes(t, u, n, m) for t, u in (*zip(call.leaves, probe.leaves), *zip(call.outputs, probe.outputs))]


def _modules_around(name: str) -> list[str]:
    """The module named ``name`` and the modules that contain it, innermost first, less the model
    itself (none for ``""``, the model)."""
    path = name.split(".")
    return [".".join(path[:k]) for k in range(len(path), 0, -1)] if name else []


def _axis_name(axis: int) -> str:
    return "first axis" if axis == 0 else f"axis {axis}"


def _attention_ready(m: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` (not a subclass) with one packed input projection and no
    extra key/value bias or zero attention, whose parameters are only its projections: its
    statistics can come from its four projections as :func:`_attention_closed_form` exposes them."""
    if type(m) is not nn.MultiheadAttention or not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return False
    names = {n for n, _ in m.named_parameters()}
    return "in_proj_weight" in names and names <= {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"} and not parametrize.is_parametrized(m.out_proj)


def _attention_core(heads: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None, is_causal: bool, need_weights: bool, average_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention of projected (samples, positions, features) queries, keys
    and values, with masks read as ``F.multi_head_attention_forward`` reads them (a boolean
    mask is True where attention is not allowed, a key padding mask merged into the attention
    mask per head), before the output projection; with ``need_weights`` also the attention
    weights, averaged over the heads with ``average_weights``."""
    n, targets, size = q.shape
    sources = k.shape[1]
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=q.dtype)
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the causal hint alone
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=q.dtype, check_other=False)
        is_causal = is_causal and key_padding_mask is None
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.view(n, 1, 1, sources).expand(-1, heads, -1, -1).reshape(n * heads, 1, sources)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if attn_mask is not None:
        attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(n, heads, -1, sources)
    q, k, v = (t.view(n, t.shape[1], heads, size // heads).transpose(1, 2) for t in (q, k, v))
    weights = None
    if need_weights:  # explicit weights, the query scaled first, as torch computes them then
        scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
        weights = F.softmax(scores if attn_mask is None else scores + attn_mask, dim=-1)
        mixed = weights @ v
        weights = weights.mean(1) if average_weights else weights
    else:
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal)
    return mixed.transpose(1, 2).reshape(n, targets, size), weights


def _piece(module: nn.Module, weight: str, bias: str | None, rows: slice = slice(None)) -> SimpleNamespace:
    """One product ``F.linear(a, W[rows], b[rows])`` of a module's closed form: its weight and
    bias (rows of the module's parameters ``weight`` and ``bias``), and their names."""
    return SimpleNamespace(
        weight=module.get_parameter(weight)[rows], bias=None if bias is None else module.get_parameter(bias)[rows], names=(weight, bias), rows=rows
    )


def _same_values(ours: Sequence[torch.Tensor], reals: Sequence[torch.Tensor]) -> bool:
    """Whether a recomputation gives a module's own outputs (to its dtype's rounding)."""
    with torch.no_grad():
        for mine, real in zip(ours, reals):
            tolerance = max(1e-4, 16 * torch.finfo(real.dtype).eps) * float(real.abs().max()) + 1e-30
            if mine.shape != real.shape or not float((mine.detach() - real).abs().max()) <= tolerance:
                return False
    return True


def _attention_closed_form(m: nn.MultiheadAttention, args: tuple, kwargs: dict, output) -> tuple[SimpleNamespace, list[torch.Tensor]] | None:
    """The attention recomputed with its four projections as separate products
    (:func:`_attention_core` between them), on inputs in (samples, positions, features) layout
    (a sequence-first attention's with the first two axes swapped); attention weights asked for
    (``need_weights``) are recomputed too, so that gradient through them reaches the
    projections. Returns the projections' record and the recomputed outputs, or ``None``."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
    given = {**dict(zip(names, args)), **kwargs}
    query, key, value = given["query"], given["key"], given["value"]
    if query.dim() != 3:
        return None
    need_weights = bool(given.get("need_weights", True))
    size = m.embed_dim
    inputs = [query, key, value] if m.batch_first else [t.transpose(0, 1) for t in (query, key, value)]
    bias = "in_proj_bias" if m.in_proj_bias is not None else None
    pieces = [_piece(m, "in_proj_weight", bias, slice(k * size, (k + 1) * size)) for k in range(3)]
    projected = [F.linear(t, piece.weight, piece.bias) for t, piece in zip(inputs, pieces)]
    try:
        mixed, weights = _attention_core(
            m.num_heads, *projected, given.get("key_padding_mask"), given.get("attn_mask"), given.get("is_causal", False), need_weights, bool(given.get("average_attn_weights", True))
        )
    except Exception:  # noqa: BLE001 - masks or shapes this recomputation does not read as torch does: replayed instead
        return None
    pieces.append(_piece(m, "out_proj.weight", "out_proj.bias" if m.out_proj.bias is not None else None))
    out = F.linear(mixed, pieces[-1].weight, pieces[-1].bias)
    ours = [out if m.batch_first else out.transpose(0, 1)] + ([weights] if need_weights else [])  # weights: samples first either way
    return SimpleNamespace(pieces=pieces, inputs=[t.detach() for t in (*inputs, mixed)], outputs=[*projected, out]), ours


def _rnn_closed_form(m: nn.RNN | nn.GRU | nn.LSTM, args: tuple, kwargs: dict, output) -> tuple[SimpleNamespace, list[torch.Tensor]] | None:
    """An RNN, GRU or LSTM recomputed step by step, each layer and direction's input projection
    one product over the whole sequence and its hidden projection one product per step, plus a zero
    tensor of the steps' shape (``h W_hh^T + b_hh + Z[:, t]``) so that one gradient (``Z``'s)
    holds every step's; inputs in (samples, steps, features) layout. Returns the
    products' record and the recomputed output and final states, or ``None`` (a packed or
    unbatched input)."""
    given = {**dict(zip(("input", "hx"), args)), **kwargs}
    x, hx = given["input"], given.get("hx")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        return None
    lstm, gru = isinstance(m, nn.LSTM), isinstance(m, nn.GRU)
    x = x if m.batch_first else x.transpose(0, 1)
    n, steps = x.shape[:2]
    directions, size = 2 if m.bidirectional else 1, m.hidden_size
    if hx is None:
        h0 = c0 = x.new_zeros(m.num_layers * directions, n, size)
    else:
        h0, c0 = hx if lstm else (hx, None)
    pieces, inputs, outputs, finals, cells = [], [], [], [], []
    layer_input = x
    for layer in range(m.num_layers):
        sequences = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            ih = _piece(m, "weight_ih" + suffix, "bias_ih" + suffix if m.bias else None)
            hh = _piece(m, "weight_hh" + suffix, "bias_hh" + suffix if m.bias else None)
            gates_in = F.linear(layer_input, ih.weight, ih.bias)
            zero = torch.zeros(n, steps, hh.weight.shape[0], dtype=gates_in.dtype, device=gates_in.device, requires_grad=True)
            # the hidden projection's bias and the zero added over the whole sequence at once, so
            # that a step's hidden projection is one product (torch.addmm); each sequence-long
            # tensor is split into steps by one unbind, whose backward stacks the steps' gradients
            # (a slice per step would fill a whole-sequence gradient per step)
            added = zero if hh.bias is None else zero + hh.bias
            weight = hh.weight.t()
            if gru:  # the hidden projection of the new gate is scaled by the reset gate
                step_rz, step_n = (part.unbind(1) for part in gates_in.split([2 * size, size], 2))
                step_added = added.unbind(1)
            else:  # the gates are the sum of the two projections
                step_added = (gates_in + added).unbind(1)
            h, c = h0[layer * directions + direction], c0[layer * directions + direction] if lstm else None
            before, after = [None] * steps, [None] * steps
            for t in range(steps) if direction == 0 else range(steps - 1, -1, -1):
                before[t] = h
                projected = torch.addmm(step_added[t], h, weight)
                if lstm:
                    i, f, _, o = torch.sigmoid(projected).chunk(4, 1)
                    c = torch.addcmul(f * c, i, torch.tanh(projected.narrow(1, 2 * size, size)))
                    h = o * torch.tanh(c)
                elif gru:
                    h_rz, h_n = projected.split([2 * size, size], 1)
                    r, z = torch.sigmoid(step_rz[t] + h_rz).chunk(2, 1)
                    new = torch.tanh(torch.addcmul(step_n[t], r, h_n))
                    h = torch.addcmul(new, z, h - new)
                else:
                    h = torch.tanh(projected) if m.nonlinearity == "tanh" else torch.relu(projected)
                after[t] = h
            pieces += [ih, hh]
            inputs += [layer_input.detach(), torch.stack(before, 1).detach()]
            outputs += [gates_in, zero]
            sequences.append(torch.stack(after, 1))
            finals.append(h)
            cells.append(c)
        layer_input = torch.cat(sequences, 2) if directions == 2 else sequences[0]
    out = layer_input if m.batch_first else layer_input.transpose(0, 1)
    ours = [out, torch.stack(finals)] + ([torch.stack(cells)] if lstm else [])
    return SimpleNamespace(pieces=pieces, inputs=inputs, outputs=outputs), ours


def _rnn_ready(m: nn.Module) -> bool:
    """An ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` (not a subclass; no LSTM projection) whose
    parameters are only its own weights, as :func:`_rnn_closed_form` reads them."""
    if type(m) not in (nn.RNN, nn.GRU, nn.LSTM) or getattr(m, "proj_size", 0) or parametrize.is_parametrized(m):
        return False
    return {n for n, _ in m.named_parameters()} == set(m._flat_weights_names)


def _closed_form(m: nn.Module) -> Callable | None:
    """The recomputation that gives a module's parameters closed-form statistics, if any."""
    if _attention_ready(m):
        return _attention_closed_form
    return _rnn_closed_form if _rnn_ready(m) else None


@contextmanager
def _record_closed_forms(modules: Sequence[nn.Module]) -> Iterator[list[list[SimpleNamespace | None]]]:
    """Expose the products inside each module that has a closed form (:func:`_closed_form`:
    attention's projections, a recurrent layer's input and hidden projections): its outputs
    become their own values plus, with a zero value and the same gradient, the module
    recomputed with those products as separate ``F.linear`` calls, whose inputs and outputs are
    recorded like a ``Linear``'s on a sequence, samples first. A call the recomputation does not
    read (no batch axis, a packed sequence), or whose recomputed values differ from the
    module's own, is recorded as ``None`` and left as it is."""
    calls: list[list[SimpleNamespace | None]] = [[] for _ in modules]

    def hook(i: int):
        def fn(m: nn.Module, args: tuple, kwargs: dict, output):
            ready = isinstance(output, tuple) and isinstance(output[0], torch.Tensor) and output[0].requires_grad  # not a packed sequence
            found = _closed_form(m)(m, args, kwargs, output) if ready else None
            if found is None:
                calls[i].append(None)
                return None
            record, ours = found
            flat, spec = tree_flatten(output)
            reals = [t.detach() for t in flat[: len(ours)]]
            # the recomputation must give the module's own values (masks read as torch reads
            # them), on every call: else the call is replayed
            if not _same_values(ours, reals):
                calls[i].append(None)
                return None
            calls[i].append(record)
            return tree_unflatten([*(real + (mine - mine.detach()) for mine, real in zip(ours, reals)), *flat[len(ours) :]], spec)

        return fn

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    with removed_on_exit(handles):
        yield calls


def _linear_stats(m: nn.Linear, a: torch.Tensor, d: torch.Tensor, G: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if a.dim() != 2:  # a sequence axis: per-sample gradient sums over positions
        a, d = a.flatten(1, -2), d.flatten(1, -2)
        step = max(1, _BLOCK_ELEMENTS // m.weight.numel())  # samples per per-sample gradient block
        norms, crosses = [], []
        for i in range(0, len(a), step):
            gw = torch.bmm(d[i : i + step].transpose(1, 2), a[i : i + step])
            norms.append(torch.linalg.vector_norm(gw, dim=(1, 2)).square())
            if G is not None:
                crosses.append(gw.flatten(1) @ G["weight"].flatten())
        norm = torch.cat(norms)
        cross = torch.cat(crosses) if G is not None else None
        db = d.sum(1)
    else:
        norm = a.pow(2).sum(1) * d.pow(2).sum(1)
        cross = ((d @ G["weight"]) * a).sum(1) if G is not None else None
        db = d
    if m.bias is not None:
        norm = norm + db.pow(2).sum(1)
        if G is not None:
            cross = cross + db @ G["bias"]
    return norm, cross


def _patch_gram(m: nn.Conv2d, a: torch.Tensor, out_size: Sequence[int], unfold: bool | None = None) -> torch.Tensor:
    """Per-sample Gram matrix of a convolution's input patches, ``U^T U`` (n x L x L).

    Either from the unfolded patches (``L^2 C k^2`` multiply-adds, plus the unfolded copy) or,
    without unfolding, from the Gram matrix of the padded input's ``P`` positions (``P^2 C``):
    ``(U^T U)[p, q] = sum_o (A^T A)[s p + d o, s q + d o]`` over the kernel offsets ``o``, with
    stride ``s`` and dilation ``d``. ``unfold=None`` takes whichever costs fewer multiply-adds.
    """
    n, c, h, w = a.shape
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
    ho, wo = out_size
    hp, wp = h + 2 * ph, w + 2 * pw
    if unfold is None:
        unfold = (hp * wp) ** 2 >= (ho * wo) ** 2 * kh * kw
    if unfold:
        u = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)
        return torch.bmm(u.transpose(1, 2), u)
    x = F.pad(a, (pw, pw, ph, ph)).flatten(2)
    g = torch.bmm(x.transpose(1, 2), x).view(n, hp, wp, hp, wp)
    total = torch.zeros(n, ho, wo, ho, wo, dtype=a.dtype)
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
        for j in range(kw):
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            total += g[:, rows, cols, rows, cols]
    return total.view(n, ho * wo, ho * wo)


def _unfold_3d(a: torch.Tensor, m: nn.Conv3d) -> torch.Tensor:
    """``F.unfold`` of a 3-D convolution's input: (n, C k_d k_h k_w, L), patches as the weight
    lays them out."""
    pad = [p for p in reversed(m.padding) for _ in range(2)]
    u = F.pad(a, pad) if any(pad) else a
    for axis, (size, stride, dilation) in enumerate(zip(m.kernel_size, m.stride, m.dilation)):
        u = u.unfold(2 + axis, dilation * (size - 1) + 1, stride)[..., ::dilation]
    return u.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(len(a), a.shape[1] * math.prod(m.kernel_size), -1)


def _conv_stats(m: nn.Conv2d | nn.Conv3d, a: torch.Tensor, d: torch.Tensor, G: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample statistics of a 2-D or 3-D convolution (zero padding).

    The per-sample weight gradient is ``D_u U_u^T`` per group of channels (output gradient times
    unfolded input, C_out/groups x L times L x C_in/groups k^2). Early layers (many positions L)
    build it as one grouped weight-gradient convolution, one group per sample and channel group,
    or as one batched product with the unfolded input where that is no larger than the layer's
    input and output (a stem with few channels, a 1x1 layer, whose unfolded input is its input).
    Late 2-D layers (L (C_out/groups + C_in/groups k^2) < C_out/groups C_in/groups k^2, the
    cheaper side of the two costs) use the Gram form ``||D U^T||^2 = sum((D^T D) * (U^T U))`` per
    channel group and never build it. 3-D layers take the grouped convolution, or the product
    where each group has at most 4 input channels (measured on 3-D stems: the grouped
    convolution with few channels per group took 1.1-4x the time).
    """
    n, c_out = d.shape[:2]
    groups = m.groups
    c_group = c_out // groups  # output channels per group
    spatial = tuple(range(2, d.dim()))
    positions = d[0, 0].numel()
    patch = m.weight[0].numel()  # C_in / groups * kernel volume
    planar = d.dim() == 4
    norms, crosses = [], []
    if planar and positions * (c_group + patch) < c_group * patch:
        padded = (a.shape[2] + 2 * m.padding[0]) * (a.shape[3] + 2 * m.padding[1])
        step = max(1, _BLOCK_ELEMENTS // (groups * (positions * (positions + patch) + padded * padded)))
        wide = torch.promote_types(d.dtype, torch.float32)  # float16 Gram entries overflow
        for i in range(0, n, step):
            k = len(a[i : i + step])
            dd = d[i : i + step].reshape(k * groups, c_group, positions).to(wide)
            grams = _patch_gram(m, a[i : i + step].reshape(k * groups, -1, *a.shape[2:]).to(wide), d.shape[2:])
            norms.append((torch.bmm(dd.transpose(1, 2), dd) * grams).sum((1, 2)).view(k, groups).sum(1))
        if G is not None:
            out = F.conv2d(a, G["weight"], None, m.stride, m.padding, m.dilation, groups)
            crosses.append((out * d).sum((1, 2, 3)))
    else:
        # unfolding 1x1 kernels is sampling the input at the stride: always the product
        pointwise = all(k == 1 for k in m.kernel_size) and not any(m.padding)
        # measured on ResNet-18's stem: the batched product takes 0.6x the grouped convolution
        if planar:
            unfold = pointwise or groups * patch * positions <= a[0].numel() + d[0].numel()
        else:
            unfold = pointwise or patch <= 4 * math.prod(m.kernel_size)
        step = max(1, _BLOCK_ELEMENTS // (c_out * patch + (groups * patch * positions if unfold else 0)))
        Gw = G["weight"].flatten() if G is not None else None
        for i in range(0, n, step):
            k = len(a[i : i + step])
            if unfold:
                if pointwise:
                    u = a[(slice(i, i + step), slice(None), *(slice(None, None, st) for st in m.stride))].flatten(2)
                elif planar:
                    u = F.unfold(a[i : i + step], m.kernel_size, m.dilation, m.padding, m.stride)
                else:
                    u = _unfold_3d(a[i : i + step], m)
                dd = d[i : i + step].reshape(k * groups, c_group, positions)
                gw = torch.bmm(dd, u.reshape(k * groups, patch, positions).transpose(1, 2)).view(k, -1)
            else:
                gw = torch.ops.aten.convolution_backward(
                    d[i : i + step].reshape(1, k * c_out, *d.shape[2:]),
                    a[i : i + step].reshape(1, -1, *a.shape[2:]),
                    m.weight.new_empty((k * c_out, *m.weight.shape[1:])),  # only its shape is read
                    None, m.stride, m.padding, m.dilation, False, [0] * len(spatial), k * groups, [False, True, False],
                )[1].view(k, -1)
            norms.append(torch.linalg.vector_norm(gw, dim=1, dtype=torch.promote_types(gw.dtype, torch.float32)).square())
            if Gw is not None:
                crosses.append(gw @ Gw)
    norm = torch.cat(norms)
    cross = torch.cat(crosses) if G is not None else None
    if m.bias is not None:
        db = d.sum(spatial)
        norm = norm + db.pow(2).sum(1)
        if G is not None:
            cross = cross + db @ G["bias"]
    return norm, cross


def _conv_layer_stats(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, a: torch.Tensor, d: torch.Tensor, G: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``Conv2d`` or ``Conv3d``, or a ``Conv1d`` as the ``Conv2d`` of height one that computes
    the same; a string padding, or a padding mode other than zeros, as the padded input the layer
    convolves ("same": ``dilation (k - 1)`` in all, the odd one on the right, as torch pads).
    :func:`_conv_stats` reads only the geometry, groups, weight and bias, so the layer it gets is a
    namespace."""
    padding = m.padding
    if isinstance(padding, str) or m.padding_mode != "zeros":
        if isinstance(padding, str):
            total = [dl * (k - 1) if padding == "same" else 0 for k, dl in zip(m.kernel_size, m.dilation)]
            sides = [(t // 2, t - t // 2) for t in total]
        else:
            sides = [(p, p) for p in padding]
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        a = F.pad(a, [p for side in reversed(sides) for p in side], mode=mode)
        padding = (0,) * len(sides)
    weight, geometry = m.weight, (m.kernel_size, m.stride, padding, m.dilation)
    if isinstance(m, nn.Conv1d):  # height one
        a, d, weight = a.unsqueeze(2), d.unsqueeze(2), weight.unsqueeze(2)
        G = None if G is None else {**G, "weight": G["weight"].unsqueeze(2)}
        geometry = tuple((one, *g) for one, g in zip((1, 1, 0, 1), geometry))
    names = ("kernel_size", "stride", "padding", "dilation")
    layer = SimpleNamespace(**dict(zip(names, geometry)), weight=weight, bias=m.bias, groups=m.groups)
    return _conv_stats(layer, a, d, G)


def _affine_stats(g_weight: torch.Tensor, g_bias: torch.Tensor | None, G: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm and cross term from per-sample weight and bias gradients, each (n, parameter size),
    in the wider of their dtype and ``G``'s (a float32 norm layer in a bfloat16 model gets
    bfloat16 inputs and output gradients, and its ``G`` is float32; BatchNorm and PReLU
    statistics are summed in float32, and a bfloat16 layer's ``G`` is bfloat16)."""
    if G is not None:
        dtype = torch.promote_types(g_weight.dtype, G["weight"].dtype)
        g_weight = g_weight.to(dtype)
        g_bias = g_bias.to(dtype) if g_bias is not None else None
        G = {k: v.to(dtype) for k, v in G.items()}
    norm = g_weight.pow(2).sum(1)
    cross = g_weight @ G["weight"].flatten() if G is not None else None
    if g_bias is not None:
        norm = norm + g_bias.pow(2).sum(1)
        if G is not None:
            cross = cross + g_bias @ G["bias"].flatten()
    return norm, cross


def _bn_stats(m: nn.modules.batchnorm._BatchNorm, a: torch.Tensor, d: torch.Tensor, G: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    # g_gamma = sum d * (a - mean) / std = (sum d * a - mean * g_beta) / std over the positions,
    # with no normalized copy of the activations; in at least float32, as the difference cancels
    # the digits that the mean shares with the activations (too many for bfloat16 sums)
    n, c = d.shape[:2]
    wide = torch.promote_types(d.dtype, torch.float32)
    a, d = a.to(wide), d.to(wide)
    g_bias = d.reshape(n, c, -1).sum(2)
    g_weight = ((d * a).reshape(n, c, -1).sum(2) - m.running_mean * g_bias) * torch.rsqrt(m.running_var + m.eps)
    return _affine_stats(g_weight, g_bias, G)


def _prelu_stats(m: nn.PReLU, a: torch.Tensor, d: torch.Tensor, G: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    # the slope multiplies the negative part: g = sum d * min(a, 0) over each channel's
    # positions (axis 1 holds the channels), or over everything for a single slope
    n = len(d)
    wide = torch.promote_types(d.dtype, torch.float32)
    part = d.to(wide) * a.to(wide).clamp(max=0)
    g = part.reshape(n, -1).sum(1, keepdim=True) if m.num_parameters == 1 else part.reshape(n, m.num_parameters, -1).sum(2)
    return _affine_stats(g, None, G)


def _norm_stats(m: nn.LayerNorm | nn.RMSNorm | nn.GroupNorm | nn.modules.instancenorm._InstanceNorm, a: torch.Tensor, d: torch.Tensor, G: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm and RMSNorm (parameters on the last axes, summed over the others), GroupNorm
    and InstanceNorm (parameters per channel, summed over the positions): ``xhat`` is the
    layer's own normalization of ``a`` (an eval-mode InstanceNorm with running statistics
    normalizes as BatchNorm does)."""
    n = len(d)
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats and m.running_var is not None:
        return _bn_stats(m, a, d, G)
    if isinstance(m, nn.LayerNorm):
        xhat, shape, axis = F.layer_norm(a, m.normalized_shape, None, None, m.eps), (n, -1, m.weight.numel()), 1
    elif isinstance(m, nn.RMSNorm):
        xhat, shape, axis = F.rms_norm(a, m.normalized_shape, None, m.eps), (n, -1, m.weight.numel()), 1
    elif isinstance(m, nn.GroupNorm):
        xhat, shape, axis = F.group_norm(a, m.num_groups, None, None, m.eps), (n, m.num_channels, -1), 2
    else:
        xhat, shape, axis = F.instance_norm(a, eps=m.eps), (n, m.num_features, -1), 2
    bias = getattr(m, "bias", None)  # RMSNorm has none
    g_bias = d.reshape(shape).sum(axis) if bias is not None else None
    return _affine_stats((d * xhat).reshape(shape).sum(axis), g_bias, G)


def _embedding_stats(m: nn.Embedding, a: torch.Tensor, d: torch.Tensor, G: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample's embedding gradient has one row per distinct token (its positions' output
    gradients summed, none for ``padding_idx``): the rows are summed per (sample, token) key."""
    n = len(d)
    tokens = a.reshape(n, -1)
    dd = d.reshape(n, tokens.shape[1], -1)
    if m.padding_idx is not None:
        dd = dd * (tokens != m.padding_idx).unsqueeze(2).to(dd.dtype)
    keys, where = torch.unique(tokens + m.num_embeddings * torch.arange(n)[:, None], return_inverse=True)
    rows = dd.new_zeros(len(keys), dd.shape[2]).index_add_(0, where.flatten(), dd.reshape(-1, dd.shape[2]))
    norm = dd.new_zeros(n).index_add_(0, keys // m.num_embeddings, rows.pow(2).sum(1))
    cross = (dd * G["weight"][tokens]).sum((1, 2)) if G is not None else None
    return norm, cross


def _embedding_bag_stats(m: nn.EmbeddingBag, a: torch.Tensor, d: torch.Tensor, G: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A bag (one row of token ids) passes its output gradient ``delta`` to each of its tokens
    other than ``padding_idx``, times ``s`` (1, or one over their number for ``"mean"``): token
    ``t``'s row is ``c_t s delta`` with ``c_t`` its count in the bag, so ``||g||^2 = s^2
    ||delta||^2 sum_t c_t^2`` and ``<g, G> = s <delta, the bag's sum of G's rows>``."""
    n = len(d)
    tokens = a.reshape(n, -1)
    wide = torch.promote_types(d.dtype, torch.float32)
    counted = tokens != m.padding_idx if m.padding_idx is not None else torch.ones_like(tokens, dtype=torch.bool)
    keys, counts = torch.unique((tokens + m.num_embeddings * torch.arange(n)[:, None])[counted], return_counts=True)
    squares = torch.zeros(n, dtype=wide).index_add_(0, keys // m.num_embeddings, counts.to(wide).square())
    share = 1 / counted.sum(1).clamp(min=1).to(wide) if m.mode == "mean" else torch.ones(n, dtype=wide)
    delta = d.to(wide)
    norm = share.square() * delta.square().sum(1) * squares
    if G is None:
        return norm, None
    summed = F.embedding_bag(tokens, G["weight"].to(wide), mode="sum", padding_idx=m.padding_idx)
    return norm, share * (summed * delta).sum(1)


def _bias_stats(m: nn.Module, a: torch.Tensor, d: torch.Tensor, G: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer whose only trainable parameter is its bias (:func:`_bias_only`): the per-sample
    bias gradient is the output gradient summed over the positions (in at least float32)."""
    n, size = len(d), m.bias.numel()
    d = d.to(torch.promote_types(d.dtype, torch.float32))
    g = d.reshape(n, -1, size).sum(1) if isinstance(m, _BIAS_LAST) else d.reshape(n, size, -1).sum(2)
    return _affine_stats(g, None, None if G is None else {"weight": G["bias"]})


def _zero_stats(n: int, dtype: torch.dtype, cross: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The statistics of a layer whose output gets no gradient."""
    return torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype) if cross else None


# The classes with a fast path: each one's statistics, and the methods its subclasses must not
# override (a subclass that computes something else, weight standardization say, is not covered).
_FAST = {
    nn.Linear: (_linear_stats, ("forward",)),
    nn.Conv1d: (_conv_layer_stats, ("forward", "_conv_forward")),
    nn.Conv2d: (_conv_layer_stats, ("forward", "_conv_forward")),
    nn.Conv3d: (_conv_layer_stats, ("forward", "_conv_forward")),
    nn.BatchNorm1d: (_bn_stats, ("forward",)),
    nn.BatchNorm2d: (_bn_stats, ("forward",)),
    nn.BatchNorm3d: (_bn_stats, ("forward",)),
    nn.LayerNorm: (_norm_stats, ("forward",)),
    nn.RMSNorm: (_norm_stats, ("forward",)),
    nn.GroupNorm: (_norm_stats, ("forward",)),
    nn.InstanceNorm1d: (_norm_stats, ("forward", "_apply_instance_norm")),
    nn.InstanceNorm2d: (_norm_stats, ("forward", "_apply_instance_norm")),
    nn.InstanceNorm3d: (_norm_stats, ("forward", "_apply_instance_norm")),
    nn.Embedding: (_embedding_stats, ("forward",)),
    nn.EmbeddingBag: (_embedding_bag_stats, ("forward",)),
    nn.PReLU: (_prelu_stats, ("forward",)),
}


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _feature_axes(module: nn.Module) -> int | None:
    """How many trailing axes of a covered layer's input its statistics read as features, for the
    layers whose statistics read every other axis after the samples as positions, so that their
    samples may be on any axis before the features (as in a sequence-first model); ``None`` for
    layers whose statistics need the samples first (channels on axis 1, or one bag per row)."""
    if isinstance(module, nn.Linear):
        return 1
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return len(module.normalized_shape)
    return 0 if isinstance(module, nn.Embedding) else None


def _fast_class(module: nn.Module) -> type | None:
    """The class of :data:`_FAST` that ``module`` is an instance of, if any."""
    return next((c for c in _FAST if isinstance(module, c)), None)


@contextmanager
def _quiet_batching_fallback() -> Iterator[None]:
    """Silence torch.func's note that an operator (attention's fused kernel on CPU, say) has no
    batching rule and runs sample by sample: the result is the same, and it is what is asked."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")
        yield


@contextmanager
def _own_tensors_kept(model: nn.Module) -> Iterator[None]:
    """Give every module its own parameter and buffer objects back on exit: ``functional_call``
    leaves a plain tensor in place of the ``Parameter`` of a module registered under two names
    (torch 2.13), which would cut the model off from an optimizer that holds the parameter."""
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        yield
    finally:
        for m, params, buffers in saved:
            m._parameters.update(params)
            m._buffers.update(buffers)


class ParamGradStats:
    """Per-sample ``||g_u||^2`` and ``<g_u, G>`` over a model's trainable parameters.

    Covered layers (see :func:`split_parameters`) take the fast path. The other parameters take
    ``torch.func`` (``vmap`` over ``grad``) on their own module where that module (or, failing
    that, the nearest module that contains it) runs once per forward pass, leaves its
    arguments as they were, and has a sample axis on the outputs that reach the logits: its
    recorded call is replayed on each sample alone against the gradient that reached each
    output from outside the module, which costs about one more pass of that module. Which axis
    of each covered layer's input and output, and of each such module's arguments and outputs,
    holds the samples (if any) is fixed on the first batch with a probe pass on two samples:
    the axis whose length follows the number of samples, so that sequence-first models
    (``batch_first=False``) keep the fast path, and a shared argument as long as the batch
    (a causal mask) is not taken for a per-sample one. Such a module that is an
    ``nn.MultiheadAttention``, ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` holding only its own
    weights is not replayed but gives its products' statistics from a recomputation in the pass
    (:func:`_record_closed_forms`) that matches its values. Parameters that no such module holds
    (one used directly by the model's own ``forward``, or tied between modules) take
    ``torch.func`` on the whole model.

    The first batch of two distinct samples or more with a nonzero gradient (passes take two
    samples at least until then; a batch of one sample, or of copies of one, checks that one,
    once) checks the fast path against the slow one: for its two distinct samples with the
    largest ``||r||`` (and, for a layer with next to no gradient on both, the first sample, of
    that batch or a later one, where it holds more than 1e-3 of the norm), each covered layer's
    and each module's two statistics are compared with a one-sample autograd pass of the whole
    model. A
    layer that disagrees (its weight also used outside its own forward, a hook that changes its
    output, a sample axis that the probe could not tell, samples moved between rows) or that
    runs more than once per forward pass moves to the general path, and a module that
    disagrees hands its parameters to the module that contains it, with a warning naming it. A
    layer that does not run (a head used only in training) has zero statistics; one that did not
    run on the batch that checked the fast path moves to the general path if it runs later.

    Parameters
    ----------
    model : the network, used in eval mode
    G : the fixed vector as ``{parameter name: tensor}``, one of its shape per trainable
        parameter (cast to its dtype; an error names a missing or misshapen one), or ``None``
        to skip the cross term
    forward_batch : samples per pass that keep the largest layer output near 8 MB, as
        :func:`param_grad_sum` measured it; measured on the first call when ``None``
    """

    def __init__(self, model: nn.Module, G: dict[str, torch.Tensor] | None, forward_batch: int | None = None) -> None:
        check_per_sample(model)
        self.model = model
        self.G = None if G is None else _parameter_vector(model, G)
        self.clone_outputs = False
        self.checked = False  # the fast path was compared with the one-sample reference on two samples
        self.checked_alone = None  # the fast path's layout when a batch of one sample last checked it
        self.unchecked_idle: set[str] = set()  # covered layers that did not run on the batch that checked
        self.unseen: set[tuple[str, str]] = set()  # layers and modules with next to no gradient where checked
        self.loop_fallback = False  # torch.func failed on this model: one sample at a time
        self.forward_batch = forward_batch
        self.failed_modules: set[str] = set()  # modules whose own replay cannot be trusted
        self.uncaptured: set[str] = set()  # modules whose closed form disagreed
        self.sample_axes: dict[str, int] = {}  # each covered layer's sample axis, fixed on the first batch
        self.per_module = True  # False: every uncovered parameter on the whole model (for comparison)
        self._plan(exclude=[])
        if not self.covered and not self.other:
            raise ValueError("the model has no trainable parameters")
        slow = sorted({self._owner(n) for n in self.other if not self._in_closed_form(n)})
        self.warned = set(slow)  # layers named as taking the slower path
        # a layer the fast path covers but for a frozen parameter: say why it takes the slower path
        frozen = {n.rpartition(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
        partly = {self._label(m) for m in frozen if m and _covered(model.get_submodule(m))}
        slow = [f"{label} with frozen parameters" if label in partly else label for label in slow]
        if slow:
            warnings.warn(f"params='all': no fast per-sample gradient for {', '.join(slow)}; using the slower torch.func path for those parameters", stacklevel=3)

    def _in_closed_form(self, param_name: str) -> bool:
        """Whether a module holding the parameter has a closed form (:func:`_closed_form`)."""
        return any(_closed_form(self.model.get_submodule(m)) is not None for m in _modules_around(param_name.rpartition(".")[0]))

    def _plan(self, exclude: list[str]) -> None:
        """Split the parameters between the fast path and the general one (the modules that
        replay their own calls are chosen on the next batch)."""
        self.excluded = exclude
        self.covered, self.other = split_parameters(self.model, exclude)
        self.units: list[SimpleNamespace] | None = None
        G = self.G
        self.G_layers = None
        if G is not None:
            self.G_layers = [{n: G[f"{name}.{n}" if name else n] for n, _ in _trainable(m)} for name, m in self.covered]
        self.layer_stats = [_bias_stats if _bias_only(m) else _FAST[_fast_class(m)][0] for _, m in self.covered]
        conv_sizes = [m.weight.numel() for _, m in self.covered if isinstance(m, _CONVOLUTIONS) and not _bias_only(m)]
        self.conv_batch = max(16, _CACHE_ELEMENTS // max(conv_sizes)) if conv_sizes else None

    def _candidates(self) -> dict[str, list[str]]:
        """Per uncovered parameter that a single module owns, the modules that may replay their
        call for it, innermost first: the owner and its ancestors below the model itself, less
        those that failed before."""
        if not self.per_module:
            return {}
        uses = Counter(id(p) for m in self.model.modules(remove_duplicate=False) for p in m.parameters(recurse=False))
        params = dict(self.model.named_parameters())
        chains = {}
        for name in self.other:
            chain = [m for m in _modules_around(name.rpartition(".")[0]) if m not in self.failed_modules]
            if uses[id(params[name])] == 1 and chain:
                chains[name] = chain
        return chains

    def _probe(self, x: torch.Tensor, modules: list[nn.Module], watched: list[str], whole: bool = False) -> tuple[int, list[list], dict[str, list[SimpleNamespace]]]:
        """A pass on two samples (one if the batch ``x`` has two; its sample twice if it has one),
        or with ``whole`` on the batch and its first sample again (which leaves lengths taken
        from the batch's longest sample as they were), recording the covered layers and the
        ``watched`` modules, so that the axes whose length follows the number of samples show:
        the probe's size of samples, the layers' records and the modules' calls (empty where the
        model cannot run the probe)."""
        n = len(x)
        m = n + 1 if whole else 1 if n == 2 else 2
        try:
            with (
                torch.enable_grad(),
                _record_layers(modules, clone=False) as records,
                _record_calls([self.model.get_submodule(name) for name in watched], clone=False) as calls,
            ):
                self.model(torch.cat([x, x[:1]]) if whole or n == 1 else x[:m])
        except Exception:  # noqa: BLE001 - a model that cannot run the probe: layers on their first axis, no module replays
            return m, [[] for _ in modules], {}
        return m, records, dict(zip(watched, calls))

    def _ambiguous(self, records: list[list], probed: list[list], calls: dict[str, list[SimpleNamespace]], probe: dict[str, list[SimpleNamespace]], n: int, m: int) -> bool:
        """Whether a layer or a candidate module has several axes that follow the number of
        samples in the probe (a length taken from the batch's longest sample that happens to
        equal the batch's size here and the probe's there), so that a probe on the whole batch
        must tell them apart."""
        layers = any(len(_layer_sample_axes(rec, seen, n, m)) > 1 for rec, seen in zip(records, probed))
        found = [_call_sample_axes(calls[name], probe.get(name, []), n, m) for name in calls]
        return layers or any(len(a) > 1 for axes in found if axes is not None for a in axes)

    def _choose_axes(self, records: list[list], probed: list[list], n: int, m: int) -> dict[str, str]:
        """Fix the sample axis of each covered layer that has none yet (all of them on the first
        batch, which the first check then compares; later batches keep them): the one axis of
        its input and output whose length follows the number of samples (``n`` in ``records``,
        ``m`` in the probe's), else the first. Returns the layers whose statistics cannot read
        the samples there, with why: among them a layer whose input and output have no such
        axis though the probe ran it the same way (one input shared by every sample, such as
        positions, or the samples merged with another axis, as in ``(N T, C)``)."""
        unread = {}
        for (name, module), rec, seen in zip(self.covered, records, probed):
            if name in self.sample_axes:
                continue
            common = _layer_sample_axes(rec, seen, n, m)
            axis = common[0] if len(common) == 1 else 0
            features = _feature_axes(module)
            if axis and (features is None or axis >= rec[0].dim() - features):
                unread[name] = f"has the samples on axis {axis} of its input, where its statistics cannot read them"
            elif not common and _same_layout(rec, seen):
                unread[name] = (
                    f"gets inputs of shape {tuple(rec[0].shape)} with no axis that follows the number of samples "
                    "(one input shared by every sample, or the samples merged with another axis)"
                )
            self.sample_axes[name] = axis
        return unread

    @property
    def layer_axes(self) -> list[int]:
        """The covered layers' sample axes, in their order (once :meth:`_choose_axes` fixed them)."""
        return [self.sample_axes[name] for name, _ in self.covered]

    def _choose_units(self, x: torch.Tensor, calls: dict[str, list[SimpleNamespace]], probe: dict[str, list[SimpleNamespace]], m: int) -> None:
        """Give each candidate parameter to the innermost of its modules that ran once on the
        batch ``x``, without changing its arguments in place, with the samples on an axis of
        some output; fix which axis of that module's arguments and outputs holds the samples:
        the one whose length is the batch's size here and the probe's size ``m`` in the
        :meth:`_probe` pass, so that a shared argument as long as the batch (a causal mask) is
        not taken for a per-sample one, nor a sequence axis as long as the batch for the samples'."""
        n = len(x)

        def layout(mname: str) -> tuple[list[int | None], list[int | None]] | None:
            """The arguments' and the outputs' sample axes (``None``: shared), if the module
            qualifies: one axis at most per tensor, one on some argument and on some output (a
            replay runs each sample's slice of its arguments: where none has the samples, as
            in a packed sequence that keeps no order of them, it would run the whole batch)."""
            found = _call_sample_axes(calls[mname], probe.get(mname, []), n, m)
            if found is None or any(len(a) > 1 for a in found):
                return None
            axes = [a[0] if a else None for a in found]
            dims, out_axes = axes[: len(calls[mname][0].leaves)], axes[len(calls[mname][0].leaves) :]
            return (dims, out_axes) if any(a is not None for a in dims) and any(a is not None for a in out_axes) else None

        layouts = {mname: layout(mname) for mname in calls}
        units: dict[str, SimpleNamespace] = {}
        for name, chain in self._candidates().items():
            mname = next((c for c in chain if layouts[c] is not None), None)
            if mname is None:
                continue
            if mname not in units:
                call = calls[mname][0]
                dims, out_axes = layouts[mname]
                shapes = [t.shape if isinstance(t, torch.Tensor) else None for t in call.leaves]
                units[mname] = SimpleNamespace(name=mname, module=self.model.get_submodule(mname), params={}, dims=dims, shapes=shapes, out_axes=out_axes, tree=call.tree, checked=False, loop=False, capture=False)
            units[mname].params[name[len(mname) + 1 :]] = name
        for unit in units.values():  # a closed form for a module holding all its parameters, with
            # the samples on its batch axis, as the recomputation reads them
            unit.capture = (
                _closed_form(unit.module) is not None
                and set(unit.params) == {n for n, _ in unit.module.named_parameters()}
                and unit.out_axes[0] == (0 if unit.module.batch_first else 1)
                and unit.name not in self.uncaptured
            )
        missed = sorted({self._owner(n) for n in self.other if self._in_closed_form(n)} - {self._owner(n) for u in units.values() if u.capture for n in u.params.values()} - self.warned)
        if missed:  # the constructor took these for closed forms
            self.warned.update(missed)
            warnings.warn(
                f"params='all': no closed form for {', '.join(missed)} as the model calls it (more than once per pass, on a packed sequence or "
                "without a sample axis, with some of its parameters frozen, or with a parameter also held by another module or under another name); "
                "using the slower torch.func path for those parameters",
                stacklevel=5,
            )
        self.units = list(units.values())

    def _unit_problem(self, unit: SimpleNamespace, calls: list[SimpleNamespace], n: int) -> str | None:
        """Why a module's recorded calls on this batch cannot be replayed as the first batch's
        layout says, if so (a shared argument may change its shape: the replay reads each
        batch's own)."""
        if len(calls) != 1:
            return f"runs {len(calls)} times per forward pass"
        call = calls[0]
        if call.changed_input:
            return "changes its own arguments in place"
        if call.tree != unit.tree or len(call.outputs) != len(unit.out_axes) or any(isinstance(t, torch.Tensor) != (shape is not None) for t, shape in zip(call.leaves, unit.shapes)):
            return "gets other arguments, or gives other outputs, than on the first batch"
        for t, dim in zip(call.leaves, unit.dims):
            if dim is not None and (t.dim() <= dim or t.shape[dim] != n):
                return f"gets an argument of shape {tuple(t.shape)}, whose {_axis_name(dim)} is not the batch's {n} samples as on the first batch"
        for t, axis in zip(call.outputs, unit.out_axes):
            if axis is not None and (t.dim() <= axis or t.shape[axis] != n):
                return f"gives an output of shape {tuple(t.shape)}, whose {_axis_name(axis)} is not the batch's {n} samples as on the first batch"
        return None

    def _unit_failed(self, reasons: dict[str, str]) -> None:
        """Hand modules' parameters on to the modules that contain them, saying why."""
        for name, why in reasons.items():
            warnings.warn(
                f"params='all': module {self._label(name)} {why}; taking its parameters' per-sample gradients on a module that contains it, or on the whole model",
                stacklevel=4,
            )
        self.failed_modules.update(reasons)
        self.units = None

    def _whole_model_params(self) -> list[str]:
        """The uncovered parameters that no module replays."""
        replayed = {full for u in self.units for full in u.params.values()}
        return [n for n in self.other if n not in replayed]

    def _demote(self, reasons: dict[str, str]) -> None:
        """Move covered layers to the general path, saying why."""
        for name, why in reasons.items():
            warnings.warn(
                f"params='all': layer {self._owner(name + '.weight')} {why}; using the slower torch.func path for its parameters",
                stacklevel=4,
            )
        self._plan([*self.excluded, *reasons])

    def _forward(self, x: torch.Tensor, modules: list[nn.Module], watched: list[str], clone: bool) -> tuple[torch.Tensor, list[list], dict[str, list[SimpleNamespace]], dict[str, list]]:
        """The logits, the covered layers' records, the calls of the ``watched`` modules and
        the projections of the attention modules among the units that take their closed form."""
        capture = [u.name for u in self.units or [] if u.capture]
        with (
            torch.enable_grad(),
            _record_layers(modules, clone) as records,
            _record_calls([self.model.get_submodule(m) for m in watched], clone) as calls,
            _record_closed_forms([self.model.get_submodule(m) for m in capture]) as closed,
        ):
            logits = self.model(x)
        return logits, records, dict(zip(watched, calls)), dict(zip(capture, closed))

    def _owner(self, param_name: str) -> str:
        return self._label(param_name.rpartition(".")[0])

    def _label(self, mname: str) -> str:
        module = self.model.get_submodule(mname) if mname else self.model
        return f"{mname or 'model'} ({type(module).__name__})"

    def __call__(self, x: torch.Tensor, pseudo_label: str = "argmax") -> tuple[torch.Tensor, torch.Tensor]:
        """Statistics for a batch ``x``.

        With ``pseudo_label="argmax"`` the gradient is taken at the model's predicted class;
        with ``"expected"`` both statistics are averaged over ``y ~ p`` (K backward passes).
        Batches are processed in sub-batches whose largest layer output is near 8 MB (measured on
        the first call, see :func:`dynal.engine.modes.forward_batch`), and for convolutional models
        at most as many samples as keep the largest per-sample weight gradient near 2 MB.
        Autograd runs also under ``torch.no_grad`` or ``torch.inference_mode``.

        Returns
        -------
        norm_sq, cross : (N,) float64 tensors (``cross`` is zeros when ``G`` is None)
        """
        check_pseudo_label(pseudo_label)
        with torch.inference_mode(False), eval_mode(self.model):
            if x.is_inference():  # made under inference_mode: autograd cannot save it
                x = x.clone()
            if self.forward_batch is None and len(x):
                self.forward_batch = forward_batch(self.model, x, run=self.model)
            size = min(self.forward_batch or len(x), self.conv_batch or len(x))
            if self._pending():  # two samples per pass at least, until a pass has checked them
                size = max(size, 2)
            if len(x) > size:
                parts = [self._batch(xs, pseudo_label) for xs in equal_parts(x, size)]
                return torch.cat([n for n, _ in parts]), torch.cat([c for _, c in parts])
            return self._batch(x, pseudo_label)

    def _batch(self, x: torch.Tensor, pseudo_label: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(x)
        norm = torch.zeros(n, dtype=torch.float64)
        cross = torch.zeros(n, dtype=torch.float64)
        if n == 0:
            return norm, cross
        modules = [m for _, m in self.covered]
        choosing = self.units is None  # watch every candidate module on this pass
        # a module taking its closed form is recorded by _record_closed_forms alone
        watched = sorted({m for chain in self._candidates().values() for m in chain}) if choosing else [u.name for u in self.units if not u.capture]
        logits, records, calls, closed = self._forward(x, modules, watched, clone=self.clone_outputs)
        if choosing:  # the sample axes of the layers and of the candidate modules' arguments and outputs
            m, probed_layers, probed_calls = self._probe(x, modules, watched)
            if self._ambiguous(records, probed_layers, calls, probed_calls, n, m):
                m, probed_layers, probed_calls = self._probe(x, modules, watched, whole=True)
            unread = self._choose_axes(records, probed_layers, n, m)
            if unread:
                self._demote(unread)
                return self._batch(x, pseudo_label)
        odd = {}
        axes = self.layer_axes
        for (name, _), rec, axis in zip(self.covered, records, axes):
            if not rec:  # not run (a head used only in training): zero statistics, which the
                continue  # check compares (a weight used outside the layer is not zero there)
            if name in self.unchecked_idle:
                odd[name] = "runs on this batch but did not on the one that checked the fast path"
                # nor can a replay of it or of a module around it be checked on two samples
                # (it may run for some samples only): its parameters take the whole model
                self.failed_modules.update(_modules_around(name))
            elif len(rec) != 3:
                odd[name] = f"runs {len(rec) // 3} times per forward pass"
            elif rec[0] is None:
                odd[name] = "gets tensors besides its input (offsets or per_sample_weights), which its statistics do not read"
            elif rec[0].dim() <= axis or rec[0].shape[axis] != n:
                odd[name] = f"gets inputs of shape {tuple(rec[0].shape)}, whose {_axis_name(axis)} is not the batch's {n} samples"
            elif rec[1].dim() <= axis or rec[1].shape[axis] != n:
                odd[name] = f"gives outputs of shape {tuple(rec[1].shape)}, whose {_axis_name(axis)} is not the batch's {n} samples"
        if odd:
            self._demote(odd)
            return self._batch(x, pseudo_label)
        if choosing:
            self._choose_units(x, calls, probed_calls, m)
        if choosing and any(u.capture for u in self.units):  # chosen on this pass: record their projections
            return self._batch(x, pseudo_label)
        problems = {u.name: why for u in self.units if not u.capture and (why := self._unit_problem(u, calls[u.name], n))}
        if problems:
            self._unit_failed(problems)
            return self._batch(x, pseudo_label)
        # the calls of the modules that replay them, not of the other candidates; with copies
        # (clone_outputs) later code can no longer rewrite what was recorded
        rewritten = any(t._version != v for u in self.units if not u.capture for t, v in calls[u.name][0].versions)
        if not self.clone_outputs and (rewritten or any(rec[1]._version != rec[2] for rec in records if rec)):
            self.clone_outputs = True  # an in-place op rewrote a recorded tensor: redo with copies
            watched = [u.name for u in self.units if not u.capture]
            logits, records, calls, closed = self._forward(x, modules, watched, clone=True)
        unsure = [u for u in self.units if u.capture and (len(closed[u.name]) != 1 or closed[u.name][0] is None or any(len(a) != n for a in closed[u.name][0].inputs))]
        if unsure:  # unbatched, or recomputed values that differ: replayed from now on, checked anew
            for u in unsure:
                self._uncapture(u)
                if len(closed[u.name]) == 1:  # (a module that runs twice is named by the replay)
                    self.warned.update(self._owner(name) for name in u.params.values())
                    warnings.warn(
                        f"params='all': module {self._label(u.name)} is called in a way its closed form does not read (a packed sequence, "
                        "an input without a batch axis, autograd turned off around it, or values its recomputation does not reproduce); replaying its call instead",
                        stacklevel=4,
                    )
            return self._batch(x, pseudo_label)
        unit_calls = [closed[u.name][0] if u.capture else calls[u.name][0] for u in self.units]
        p = F.softmax(logits.detach().double(), dim=1)
        if pseudo_label == "argmax":
            labels, label_weights = [p.argmax(1)], [torch.ones(n, dtype=torch.float64)]
        else:
            labels = [torch.full((n,), k) for k in range(p.shape[1])]
            label_weights = [p[:, k] for k in range(p.shape[1])]
        # a layer output that the logits do not depend on with a gradient (computed under
        # no_grad, detached, or not used) gives that layer a zero per-sample gradient
        targets = [rec[1] if rec else None for rec in records] + [t for call in unit_calls for t in call.outputs]
        alive = [bool(rec) and rec[1].requires_grad for rec in records] + [g for u, call in zip(self.units, unit_calls) for g in ([True] * len(call.outputs) if u.capture else call.grads)]
        live = [i for i, g in enumerate(alive) if g] if logits.requires_grad else []
        whole = self._whole_model_params()
        for j, (lab, w) in enumerate(zip(labels, label_weights)):
            # each sample's r scaled to a largest entry of 1, and its statistics (quadratic and
            # linear in r) scaled back in float64: a confident float32 model's r (1e-25 at a
            # margin of 55) would leave squares below float32's range
            r = residuals(p, lab)
            scale = r.abs().amax(1)
            scale = torch.where(scale > 0, scale, 1.0)
            r = (r / scale[:, None]).to(logits.dtype)
            w_norm, w_cross = w * scale.square(), w * scale
            last = j == len(labels) - 1
            deltas: list[torch.Tensor | None] = [None] * len(targets)
            if live:
                try:
                    grads = torch.autograd.grad(logits, [targets[i] for i in live], grad_outputs=r, retain_graph=not last, allow_unused=True)
                except CheckpointError:
                    # torch.utils.checkpoint recomputes its part of the forward pass without the
                    # closed forms' hooks, so the tensors it saves differ: the modules that took
                    # a closed form (which of them ran inside it does not show) replay instead
                    captured = [u for u in self.units if u.capture]
                    if not captured:
                        raise
                    for u in captured:
                        self._uncapture(u)
                        self.warned.update(self._owner(name) for name in u.params.values())
                    warnings.warn(
                        f"params='all': the model recomputes part of its forward pass (torch.utils.checkpoint), which the closed forms of "
                        f"{', '.join(self._label(u.name) for u in captured)} do not survive; replaying their calls instead",
                        stacklevel=4,
                    )
                    return self._batch(x, pseudo_label)
                for i, d in zip(live, grads):
                    deltas[i] = d
            with torch.no_grad():
                layers = [
                    self.layer_stats[i](layer, rec[0].movedim(axis, 0), d.movedim(axis, 0), self.G_layers[i] if self.G_layers is not None else None)
                    if d is not None
                    else _zero_stats(n, logits.dtype, self.G_layers is not None)
                    for i, (layer, rec, d, axis) in enumerate(zip(modules, records, deltas, axes))
                ]
                if layers:  # summed in float64, in one reduction per statistic
                    n_sum = torch.stack([n_l for n_l, _ in layers]).sum(0, dtype=torch.float64)
                    c_sum = torch.stack([c_l for _, c_l in layers]).sum(0, dtype=torch.float64) if self.G_layers is not None else None
                    # a float16 layer's statistics can overflow where the general path, which
                    # sums squares in float32, does not: checked on every batch with finite logits
                    if not (n_sum.isfinite().all() and (c_sum is None or c_sum.isfinite().all())) and logits.isfinite().all():
                        overflow = [name for (name, _), (n_l, c_l) in zip(self.covered, layers) if not (n_l.isfinite().all() and (c_l is None or c_l.isfinite().all()))]
                        self._demote(dict.fromkeys(overflow, "gives statistics that overflow its dtype"))
                        return self._batch(x, pseudo_label)
                    norm += w_norm * n_sum
                    if c_sum is not None:
                        cross += w_cross * c_sum
            replayed = []
            start = len(records)
            for unit, call in zip(self.units, unit_calls):
                if unit.capture:
                    replayed.append(self._captured_stats(unit, call, deltas[start : start + len(call.outputs)], n))
                    start += len(call.outputs)
                    norm += w_norm * replayed[-1][0]
                    cross += w_cross * replayed[-1][1]
                    continue
                douts = [d if first else None for d, first in zip(deltas[start : start + len(call.outputs)], call.first)]
                start += len(call.outputs)
                if any(d is not None and axis is None for d, axis in zip(douts, unit.out_axes)):
                    self._unit_failed({unit.name: "passes the logits' gradient through an output without a sample axis"})
                    return self._batch(x, pseudo_label)
                try:
                    replayed.append(self._unit_stats(unit, call, douts, n))
                except Exception as err:  # noqa: BLE001 - any error: the module cannot run on one sample as called
                    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    self._unit_failed({unit.name: f"cannot run on one sample as it was called ({reason})"})
                    return self._batch(x, pseudo_label)
                norm += w_norm * replayed[-1][0]
                cross += w_cross * replayed[-1][1]
            follow_up = bool(self.unseen) and not self._pending()
            if follow_up or self._check_due(len(x)):
                wrong, distinct = self._disagreeing(x, r, layers, replayed, follow_up)
                if not follow_up and wrong is not None:  # None: r is zero on this batch, check the next
                    if distinct < 2:  # one sample (or copies of it): once per layout
                        self.checked_alone = self._layout()
                    else:
                        self.checked = True
                        self.unchecked_idle = {name for (name, _), rec in zip(self.covered, records) if not rec}
                        for u in self.units:
                            u.checked = True
                if wrong:
                    layers_wrong = [name for name, _ in self.covered if ("layer", name) in wrong]
                    units_wrong = [u.name for u in self.units if ("module", u.name) in wrong]
                    captured = [u for u in self.units if u.capture and u.name in units_wrong]
                    if captured:  # the closed form disagrees: replay those calls, and check every
                        # layer again, whose gradients came through the recomputation
                        for u in captured:
                            self.warned.update(self._owner(name) for name in u.params.values())
                            warnings.warn(f"params='all': module {self._label(u.name)} has per-sample gradients other than its closed form gives; replaying its call instead", stacklevel=4)
                            self._uncapture(u)
                        self.checked = False
                        for u in self.units:
                            u.checked = False
                        return self._batch(x, pseudo_label)
                    if layers_wrong:
                        self._demote(dict.fromkeys(layers_wrong, "has per-sample gradients other than its input and output give (is its weight also used elsewhere, its output changed by a hook, or its samples on another axis than the probe pass showed?)"))
                    if units_wrong:
                        self._unit_failed(dict.fromkeys(units_wrong, "has per-sample gradients other than replaying its own call gives (is a parameter of it also used outside it, or its samples on other axes than the probe pass showed?)"))
                    if layers_wrong or units_wrong:
                        return self._batch(x, pseudo_label)
            if whole:
                n_o, c_o = self._other_stats(x, r, whole)
                norm += w_norm * n_o
                cross += w_cross * c_o
        return norm, cross

    def _uncapture(self, unit: SimpleNamespace) -> None:
        """A module's closed form is not taken from now on: its call replays, checked anew."""
        unit.capture, unit.checked = False, False
        self.uncaptured.add(unit.name)

    def _layout(self) -> tuple:
        """What the fast path takes now: the covered layers and the modules that replay their
        calls or take their closed form."""
        return tuple(name for name, _ in self.covered), tuple((u.name, u.capture) for u in self.units or [])

    def _pending(self) -> bool:
        """Whether a covered layer or a module has not been checked on two samples yet."""
        return not self.checked or self.units is None or not all(u.checked for u in self.units)

    def _check_due(self, n: int) -> bool:
        """Whether a batch of ``n`` samples checks the fast path (:meth:`_disagreeing`): every
        batch until one of two samples or more has checked it, but a batch of one sample only
        once per layout of the fast path (it catches a weight used twice or a hook, but not a
        model that moves its samples between rows, which gets one sample right)."""
        return self._pending() and (n >= 2 or self.checked_alone != self._layout())

    def _disagreeing(self, x: torch.Tensor, r: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor | None]], replayed: list[tuple[torch.Tensor, torch.Tensor]], follow_up: bool = False) -> tuple[set[tuple[str, str]] | None, int]:
        """Covered layers (before the first check) and modules replaying their calls (each one's
        first time) whose statistics differ from a one-sample autograd pass (by more than 1e-3
        relative to the layer's share, or 1e-5 of the sample's total, both eight times the
        dtype's rounding where that is larger, or what squares of values near the dtype's
        smallest normal number lose), named as ``("layer", name)`` and ``("module", name)``, and
        how many distinct samples were compared (at most two).

        The samples compared are the one with the largest ``||r||`` and the next largest whose
        input differs from it (a copy would repeat the comparison), and then, for each layer or
        module that holds at most 1e-4 of the fast path's norm on both (a ReLU after it dead for
        them; an error of 10% in its statistics would pass there), the sample of the batch
        where it holds the largest share, if that is more than 1e-3. Those still unseen are
        kept in ``unseen`` and, with ``follow_up`` (on the batches after the check), compared
        on such a sample alone, so that a gradient of zero where the check looked does not
        pass it unseen. ``None`` when ``r`` is zero on the first sample, so that nothing can be
        compared (a batch the model is so sure of that ``r`` underflows)."""
        G = self.G
        entries = []  # (name, parameters, their parts of G, fast norm, fast cross)
        for l, (name, m) in enumerate(self.covered):
            if not self.checked or ("layer", name) in self.unseen:
                own = _trainable(m)
                parts = [self.G_layers[l][pn] for pn, _ in own] if G is not None else None
                entries.append((("layer", name), [p for _, p in own], parts, *layers[l]))
        for unit, (n_u, c_u) in zip(self.units, replayed):
            if not unit.checked or ("module", unit.name) in self.unseen:
                own = [(full, unit.module.get_parameter(rel)) for rel, full in unit.params.items()]
                entries.append((("module", unit.name), [p for _, p in own], [G[full] for full, _ in own] if G is not None else None, n_u, c_u if G is not None else None))
        if not entries:
            self.unseen = set()
            return set(), min(2, len(x))
        fast = torch.stack([n_e.double() for _, _, _, n_e, _ in entries])  # entries x samples
        whole = torch.stack([n_l.double() for n_l, _ in [*layers, *replayed]]).sum(0)  # the fast path's norm
        share = fast / whole.clamp_min(torch.finfo(torch.float64).tiny)
        picks = []
        if follow_up and not (share > 1e-3).any():  # nothing to compare on this batch
            self.unseen = {name for name, *_ in entries}
            return set(), 0
        if not follow_up:
            size = r.double().norm(dim=1)
            order = torch.argsort(size, descending=True, stable=True).tolist()
            if not size[order[0]]:
                return None, 0
            other = (x != x[order[0]]).reshape(len(x), -1).any(1)
            picks = [order[0], *[u for u in order[1:] if other[u] and size[u]][:1]]
        floor = min(1e6 * torch.finfo(r.dtype).tiny, 1e-30)
        # wider for bfloat16 and float16 layers or logits
        rtols = [max(1e-3, 8 * torch.finfo(r.dtype).eps, *(8 * torch.finfo(p.dtype).eps for p in ps)) for _, ps, _, _, _ in entries]
        owner = [e for e, (_, ps, _, _, _) in enumerate(entries) for _ in ps]
        params = [p for _, ps, _, _, _ in entries for p in ps]
        parts = [g.double() for _, _, gs, _, _ in entries for g in gs] if G is not None else None
        g_sq = torch.zeros(len(entries), dtype=torch.float64)  # ||G||^2 per entry
        if parts is not None:
            for e, g in zip(owner, parts):
                g_sq[e] += g.pow(2).sum()
        wrong, seen = set(), torch.zeros(len(entries), dtype=torch.bool)

        def compare(u: int) -> None:  # one sample's gradient at a time: memory of one model gradient
            grads = _single_sample_grads(self.model, x[u : u + 1], r[u : u + 1], params)[0]
            ref_n = torch.zeros(len(entries), dtype=torch.float64)
            ref_c = torch.zeros(len(entries), dtype=torch.float64)
            for k, (e, g) in enumerate(zip(owner, grads)):
                ref_n[e] += g.double().pow(2).sum()
                if parts is not None:
                    ref_c[e] += (g.double() * parts[k]).sum()
            total = float(ref_n.sum())
            seen.logical_or_(torch.maximum(fast[:, u], ref_n) > 1e-4 * max(float(whole[u]), total))
            for e, (name, _, _, n_e, c_e) in enumerate(entries):
                rtol = rtols[e]
                if abs(float(n_e[u]) - ref_n[e]) > rtol * max(float(n_e[u]), float(ref_n[e])) + 1e-2 * rtol * total + floor:
                    wrong.add(name)
                bound = float((ref_n[e] * g_sq[e]).sqrt())  # |<g, G>| <= ||g|| ||G||
                if c_e is not None and abs(float(c_e[u]) - ref_c[e]) > rtol * bound + 1e-2 * rtol * (total * float(g_sq.sum())) ** 0.5 + floor:
                    wrong.add(name)

        for u in picks:
            compare(u)
        for u in sorted({int(share[e].argmax()) for e in (~seen).nonzero().flatten().tolist() if share[e].max() > 1e-3} - set(picks)):
            compare(u)
        self.unseen = {name for (name, *_), s in zip(entries, seen.tolist()) if not s} - wrong
        return wrong, len(picks)

    def _other_stats(self, x: torch.Tensor, r: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample statistics of the parameters ``names`` via ``vmap(grad)`` over the whole
        model, or one sample at a time where torch.func cannot run the model; in slices of the
        batch whose per-sample gradients of those parameters hold at most 2^26 elements (256 MB
        of float32)."""
        params = dict(self.model.named_parameters())
        size = sum(params[n].numel() for n in names)
        step = max(1, _BLOCK_ELEMENTS // max(1, size))
        G = {n: self.G[n] for n in names} if self.G is not None else None
        parts = [_grad_stats(self._other_block(x[i : i + step], r[i : i + step], params, names), G) for i in range(0, len(x), step)]
        return torch.cat([n for n, _ in parts]), torch.cat([c for _, c in parts])

    def _other_block(self, x: torch.Tensor, r: torch.Tensor, params: dict[str, nn.Parameter], names: list[str]) -> dict[str, torch.Tensor]:
        """The per-sample gradients of the parameters ``names`` for one slice of the batch."""
        if not self.loop_fallback:
            buffers = dict(self.model.named_buffers())
            fixed = {n: p.detach() for n, p in params.items() if n not in names}
            free = {n: params[n].detach() for n in names}

            def surrogate(free_params: dict[str, torch.Tensor], xi: torch.Tensor, ri: torch.Tensor) -> torch.Tensor:
                # d/dtheta <logits, r> = J^T r: the cross-entropy gradient when r = p - e_y
                out = functional_call(self.model, {**fixed, **free_params, **buffers}, (xi[None],))
                return (out[0] * ri).sum()

            try:
                with _own_tensors_kept(self.model), _quiet_batching_fallback():
                    return vmap(grad(surrogate), in_dims=(None, 0, 0))(free, x, r)
            except Exception as err:  # noqa: BLE001 - torch.func raises several kinds
                self.loop_fallback = True
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                warnings.warn(f"params='all': torch.func cannot take per-sample gradients of this model ({reason}); taking them one sample at a time", stacklevel=5)
        rows = _single_sample_grads(self.model, x, r, [params[n] for n in names])
        return {n: torch.stack([row[k] for row in rows]) for k, n in enumerate(names)}

    def _captured_stats(self, unit: SimpleNamespace, call: SimpleNamespace, douts: list[torch.Tensor | None], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A module's statistics from the products of its closed form (see
        :func:`_record_closed_forms`), each a ``Linear`` on a sequence whose ``G`` is the rows of
        the parameters it reads; in at least float32, which float16 squares can overflow."""
        norm = torch.zeros(n, dtype=torch.float64)
        cross = torch.zeros(n, dtype=torch.float64)
        with torch.no_grad():
            for piece, a, d in zip(call.pieces, call.inputs, douts):
                if d is None:
                    continue
                wide = torch.promote_types(d.dtype, torch.float32)
                part = None
                if self.G is not None:
                    part = {key: self.G[unit.params[name]][piece.rows].to(wide) for key, name in zip(("weight", "bias"), piece.names) if name is not None}
                n_k, c_k = _linear_stats(piece, a.to(wide), d.to(wide), part)
                norm += n_k.double()
                if c_k is not None:
                    cross += c_k.double()
        return norm, cross

    def _unit_stats(self, unit: SimpleNamespace, call: SimpleNamespace, douts: list[torch.Tensor | None], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample statistics of a module's own uncovered parameters from its recorded call
        and output gradients, with ``vmap(grad)`` over the module alone (or one sample at a
        time where torch.func cannot run it), in slices as :meth:`_other_stats` takes them."""
        used = [k for k, d in enumerate(douts) if d is not None]
        if not used:  # no output reaches the logits with a gradient
            return _zero_stats(n, torch.float64, True)
        size = sum(unit.module.get_parameter(rel).numel() for rel in unit.params)
        step = max(1, _BLOCK_ELEMENTS // max(1, size))
        G = {full: self.G[full] for full in unit.params.values()} if self.G is not None else None
        parts = []
        for i in range(0, n, step):
            size = min(step, n - i)
            leaves = [t if dim is None else t.narrow(dim, i, size) for t, dim in zip(call.leaves, unit.dims)]
            cotangents = [douts[k].narrow(unit.out_axes[k], i, size) for k in used]
            parts.append(_grad_stats(self._unit_block(unit, call.tree, leaves, used, cotangents, size), G))
        return torch.cat([n for n, _ in parts]), torch.cat([c for _, c in parts])

    def _unit_block(self, unit: SimpleNamespace, tree, leaves: list, used: list[int], cotangents: list[torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """The per-sample gradients of a module's own uncovered parameters for a slice of ``n``
        samples: the gradient of ``sum_k <output_k, cotangent_k>`` with the module run on each
        sample alone (as a batch of one, on the sample axis of each argument and output), the
        arguments without a sample axis shared."""
        module, names = unit.module, list(unit.params)
        mapped = [k for k, dim in enumerate(unit.dims) if dim is not None]
        out_axes = [unit.out_axes[k] for k in used]

        def outputs(sample_leaves: Sequence[torch.Tensor], params: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
            full = list(leaves)
            for k, t in zip(mapped, sample_leaves):
                full[k] = t
            args, kwargs = tree_unflatten(full, tree)
            out = module(*args, **kwargs) if params is None else functional_call(module, params, args, kwargs)
            return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]

        if not unit.loop:
            free = {rel: module.get_parameter(rel).detach() for rel in names}
            fixed = {rel: p.detach() for rel, p in module.named_parameters() if rel not in unit.params}
            buffers = dict(module.named_buffers())

            def surrogate(free_params: dict[str, torch.Tensor], sample_leaves: list[torch.Tensor], sample_cot: list[torch.Tensor]) -> torch.Tensor:
                outs = outputs([t.unsqueeze(unit.dims[k]) for k, t in zip(mapped, sample_leaves)], {**fixed, **free_params, **buffers})
                return sum((outs[k].select(axis, 0) * c).sum() for k, axis, c in zip(used, out_axes, sample_cot))

            try:
                with _own_tensors_kept(module), _quiet_batching_fallback():
                    g = vmap(grad(surrogate), in_dims=(None, [unit.dims[k] for k in mapped], out_axes))(free, [leaves[k] for k in mapped], cotangents)
                return {unit.params[rel]: v for rel, v in g.items()}
            except Exception as err:  # noqa: BLE001 - torch.func raises several kinds
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]

        def loss(i: int) -> torch.Tensor:
            outs = outputs([leaves[k].narrow(unit.dims[k], i, 1) for k in mapped])
            return sum((outs[k].select(axis, 0) * c.select(axis, i)).sum() for k, axis, c in zip(used, out_axes, cotangents))

        # an error here too means the module cannot run on one sample as recorded (see _batch)
        rows = _one_sample_grads(loss, n, [module.get_parameter(rel) for rel in names])
        if not unit.loop:
            unit.loop = True
            warnings.warn(f"params='all': torch.func cannot take per-sample gradients of {self._label(unit.name)} ({reason}); taking them one sample at a time", stacklevel=5)
        return {unit.params[rel]: torch.stack([row[j] for row in rows]) for j, rel in enumerate(names)}
