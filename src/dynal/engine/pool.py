"""The streamed pass over the pool: one walk in chunks, computing only what is asked."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cache
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController
from torch import nn
from tqdm.auto import tqdm

from dynal.engine.modes import eval_mode
from dynal.engine.outputs import LABELED_STATS, POOL_OUTPUTS, Chunk, Context, head_has_bias


def check_names(names: Sequence[str], known: dict[str, Any], what: str) -> None:
    """Raise a clear error for an output or statistic the engine does not know."""
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; the engine computes {sorted(known)}")


def labeled_stats(
    model: nn.Module,
    names: Sequence[str],
    X: np.ndarray,
    y: np.ndarray,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Compute the named labeled-set statistics, plus whether the model's head has a bias
    (``head_bias``, which the last-layer closed forms read)."""
    check_names(names, LABELED_STATS, "labeled-set statistics")
    stats: dict[str, Any] = {"head_bias": head_has_bias(model)}
    with eval_mode(model):
        for name in names:
            computed = LABELED_STATS[name](model, X, y, batch_size)
            for key, value in computed.items():
                if not all(_finite(v) for v in (value.values() if isinstance(value, dict) else [value])):
                    raise ValueError(f"the labeled-set statistic {key!r} contains NaN or infinite values: check the labeled inputs and the model")
            stats.update(computed)
    return stats


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return bool(np.isfinite(value).all())


@cache
def _thread_pools() -> ThreadpoolController:
    """The process's native thread pools, found once: scanning the loaded libraries costs about
    2 ms, a tenth of a whole pass over 8,192 images with a small MLP. Libraries loaded after the
    first query are not limited, which can cost speed but never changes a result."""
    return ThreadpoolController()


def pool_chunks(
    model: nn.Module,
    X: np.ndarray,
    ids: np.ndarray,
    outputs: Sequence[str],
    ctx: Context,
    chunk_size: int = 1024,
    progress: bool = False,
    rows: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Walk the pool once in eval mode and yield, per chunk, ``ids`` and the named outputs (the
    model's own train/eval modes and numpy's BLAS threads come back when the walk ends: close
    the generator, e.g. with ``contextlib.closing``, where its consumer may stop early or raise).

    Parameters
    ----------
    model : a model with ``features`` and ``head``
    X, ids : inputs and the dataset ids of the pool, aligned with ``rows``
    rows : the rows of ``X`` that form the pool (default: all), so the pool is never copied
    outputs : names from :data:`dynal.engine.outputs.POOL_OUTPUTS`
    ctx : labeled statistics, generator and per-output options
    chunk_size : rows per chunk (the forward passes within a chunk take as many rows as keep the
        largest layer output near 8 MB, see :func:`dynal.engine.modes.forward_batch`)
    progress : show a progress bar
    """
    check_names(outputs, POOL_OUTPUTS, "pool outputs")
    if rows is not None and np.asarray(rows).dtype.kind not in "iu":
        raise ValueError(f"rows must be integer positions in X, got an array of {np.asarray(rows).dtype} (for a mask, pass np.flatnonzero(mask))")
    n = len(X) if rows is None else len(rows)
    if n != len(ids):
        raise ValueError(f"pool has {n} inputs but {len(ids)} ids")
    # torch's OpenMP threads and numpy's BLAS threads spin on the same cores when their calls
    # alternate chunk by chunk, which made a pass up to 30x slower: torch alone runs threaded
    # while the pass (and the strategy's per-chunk numpy work) is under way.
    with eval_mode(model), _thread_pools().limit(limits=1, user_api="blas"):
        for i in tqdm(range(0, n, chunk_size), desc="scoring pool", unit="chunk", disable=not progress, leave=False):
            x = torch.from_numpy(np.ascontiguousarray(X[i : i + chunk_size] if rows is None else X[rows[i : i + chunk_size]]))
            chunk = Chunk(model, x, ctx.cache)  # forward passes sized once per query, see Chunk
            out: dict[str, np.ndarray] = {"ids": np.asarray(ids[i : i + chunk_size], dtype=np.int64)}
            for name in outputs:
                out.update(POOL_OUTPUTS[name](chunk, ctx))
            yield out
