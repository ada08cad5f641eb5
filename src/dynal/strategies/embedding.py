"""Strategies on the last layer's gradient embedding ``g(x, y) = (p - e_y) ⊗ h``.

- BADGE (Ash et al., ICLR 2020): k-means++ seeding on ``g(x, argmax p)``.
- EGL (Settles, Craven & Ray, NIPS 2007): expected gradient length ``E_{y~p} ||g(x, y)||``.
- BAIT (Ash et al., NeurIPS 2021): greedy Fisher-information (A-optimal) design on the last layer.

None of them stores the N x (K·d) embedding: each works from ``r`` or ``p`` (N x K) and ``h``
(N x d) through the factorization ``<a ⊗ h, b ⊗ h'> = (a·b)(h·h')``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from dynal.engine.topk import argmax_tied, draw_salt, tie_keys
from dynal.strategies.base import Chunks, ScoreStrategy, Strategy
from dynal.strategies.collect import floor_sq_dists, gather
from dynal.strategies.uncertainty import other_classes
from dynal.validation import is_integer

# Largest temporary block formed at once, in float64 entries (8 MB).
_BLOCK = 1 << 20


# ----------------------------------------------------------------------------- BADGE
def badge_sq_dists(r: np.ndarray, h: np.ndarray, norm2: np.ndarray, i: int) -> np.ndarray:
    """``||g_u - g_i||² = ||g_u||² + ||g_i||² - 2 (r_u·r_i)(h_u·h_i)`` for every ``u``, floored at 0."""
    scale = norm2 + norm2[i]
    return floor_sq_dists(scale - 2.0 * (r @ r[i]) * (h @ h[i]), scale)


class BADGE(Strategy):
    """BADGE: k-means++ seeding on the gradient embedding ``(p - e_ŷ) ⊗ h``, ``ŷ = argmax p``.

    The first centre is the sample with the largest embedding norm (ties: the generator's per-id
    keys); each next one is drawn with probability ∝ D², its squared distance to the nearest
    centre, by the generator, over the pool in id order (so the draw does not depend on pool
    order). Distances use the factorized form, so only ``r`` (N x K), ``h`` (N x d) and the
    running D² vector are kept: O(N·(K + d)) memory and O(b·N·(K + d)) time. Picked samples and
    copies of a centre get zero mass; once every remaining sample coincides with a centre the
    rest are drawn uniformly, so ids are always distinct. The score of a pick is its D² when
    drawn (the first pick: its squared norm).
    """

    name = "badge"
    outputs = ("last_layer_grad",)

    def select(self, chunks: Chunks, stats: Mapping[str, Any], budget: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ids, arrays = gather(chunks, ["r", "h"])
        r, h = arrays["r"], arrays["h"]
        by_id = np.argsort(ids, kind="stable")  # D² is drawn over the pool in id order
        budget = min(budget, len(ids))
        if budget <= 0:
            return ids[:0], np.empty(0)
        keys = tie_keys(ids, draw_salt(rng))
        norm2 = np.einsum("nk,nk->n", r, r) * np.einsum("nd,nd->n", h, h)
        i = argmax_tied(norm2, keys)
        picks, scores = [i], [norm2[i]]
        free = np.ones(len(ids), dtype=bool)
        free[i] = False
        d2 = badge_sq_dists(r, h, norm2, i)
        for _ in range(1, budget):
            cum = np.cumsum(np.where(free, d2, 0.0)[by_id])
            if cum[-1] > 0:
                u = rng.random() * cum[-1]
                # the first position past u; capped at the last positive weight should u round up to the total
                i = int(by_id[min(np.searchsorted(cum, u, side="right"), np.searchsorted(cum, cum[-1]))])
            else:
                i = argmax_tied(free.astype(np.int8), keys)
            picks.append(i)
            scores.append(d2[i])
            free[i] = False
            np.minimum(d2, badge_sq_dists(r, h, norm2, i), out=d2)
        return ids[picks], np.asarray(scores)


# ----------------------------------------------------------------------------- EGL
class EGL(ScoreStrategy):
    """Expected gradient length of the last layer: ``E_{y~p} ||g(x, y)||``.

    ``||g(x, k)|| = ||p - e_k|| sqrt(||h||² + 1)`` (the ``+1`` is the head's bias, dropped
    without one) and ``||p - e_k||² = (1 - p_k)² + Σ_{j≠k} p_j²``, so the score is
    ``sqrt(||h||² + 1) Σ_k p_k ||p - e_k||``: O(K + d) per sample, streamed in O(b) memory.
    The labeled set's gradient is taken as zero, as in EGL; dynamicAL keeps it.
    """

    name = "egl"
    outputs = ("probs", "head_features")

    def score(self, chunk: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> np.ndarray:
        p, h = chunk["probs"], chunk["features"].astype(np.float64)
        sq = np.einsum("nk,nk->n", p, p)[:, None]
        res_sq = (1.0 - p) ** 2 + sq - p**2
        res = np.sqrt(np.maximum(res_sq, 0.0))
        # at the most likely class y, ||p - e_y||^2 = (1 - p_y)^2 + sum_{j != y} p_j^2 is tiny for
        # a confident sample, and 1 - p_y and sq - p_y^2 cancel: summed from the other p instead,
        # scaled by the largest so that the squares do not underflow (p_j below 1e-154)
        rows, y = np.arange(len(p)), p.argmax(1)
        others = other_classes(p)
        top = others.max(1, keepdims=True)
        unit = others / np.where(top > 0, top, 1.0)
        res[rows, y] = top[:, 0] * np.sqrt(unit.sum(1) ** 2 + np.einsum("nk,nk->n", unit, unit))
        return np.einsum("nk,nk->n", p, res) * np.sqrt(np.einsum("nd,nd->n", h, h) + float(stats["head_bias"]))


# ----------------------------------------------------------------------------- BAIT
def fisher_sum(p: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``Σ_x (diag(p_x) - p_x p_xᵀ) ⊗ h_x h_xᵀ``, the summed last-layer Fisher (D x D, D = K·d)."""
    K, d = p.shape[1], h.shape[1]
    out = np.zeros((K * d, K * d))
    rows = max(1, _BLOCK // (K * d))
    for a in range(0, len(p), rows):
        pb, hb = p[a : a + rows], h[a : a + rows]
        w = (pb[:, :, None] * hb[:, None, :]).reshape(len(pb), K * d)
        out -= w.T @ w
        for k in range(K):
            out[k * d : (k + 1) * d, k * d : (k + 1) * d] += (hb * pb[:, k : k + 1]).T @ hb
    return out


def _factor(p: np.ndarray, c: float) -> np.ndarray:
    """``A_x = (I - p 1ᵀ) diag(sqrt(p / c))`` per sample, so ``I(x) / c = (A_x ⊗ h)(A_x ⊗ h)ᵀ``."""
    K = p.shape[1]
    return (np.eye(K) - p[:, :, None]) * np.sqrt(p / c)[:, None, :]


def _sandwich(h: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``V_xᵀ B V_x`` (K x K) per sample, ``V_x = A_x ⊗ h_x``, for a D x D matrix ``B``."""
    n, d = h.shape
    K = A.shape[1]
    B4 = B.reshape(K, d, K, d).transpose(1, 0, 2, 3).reshape(d, K * K * d)
    out = np.empty((n, K, K))
    rows = max(1, _BLOCK // (K * K * d))
    for a in range(0, n, rows):
        hb = h[a : a + rows]
        inner = np.einsum("nkli,ni->nkl", (hb @ B4).reshape(len(hb), K, K, d), hb)
        out[a : a + rows] = A[a : a + rows].transpose(0, 2, 1) @ inner @ A[a : a + rows]
    return out


def _left(h: np.ndarray, A: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``V_xᵀ X`` (K x K) per sample for a D x K matrix ``X``."""
    n, d = h.shape
    K = A.shape[1]
    G = (h @ X.reshape(K, d, K).transpose(1, 0, 2).reshape(d, K * K)).reshape(n, K, K)
    return A.transpose(0, 2, 1) @ G


def _times(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``X_x C`` for every sample, as one matrix product."""
    n, K, _ = X.shape
    return (X.reshape(n * K, K) @ C).reshape(n, K, K)


def _trace_solve(S: np.ndarray, R: np.ndarray) -> np.ndarray:
    """``tr(S_x⁻¹ R_x)`` per sample."""
    return np.einsum("nkk->n", np.linalg.solve(S, R))


class _FullFisher:
    """BAIT's state with full D x D matrices and per-candidate K x K Woodbury factors.

    ``P = M⁻¹`` and, per candidate ``x`` with ``V_x = A_x ⊗ h_x``, ``Q_x = V_xᵀ P V_x`` and
    ``R_x = V_xᵀ P F P V_x``: adding ``x`` lowers ``tr(P F)`` by ``tr((I + Q_x)⁻¹ R_x)``,
    removing it raises it by ``tr((I - Q_x)⁻¹ R_x)``. A change ``P ← P - U C Uᵀ`` (rank K)
    updates every ``Q_x``, ``R_x`` in O(K²(d + K)) each; with ``exact``, ``P``, ``Q`` and ``R``
    are computed anew from ``M`` after each change instead (O(D³ + N·K²·d²)), which does not
    lose the digits those updates cancel when the ridge is small against the information.
    """

    def __init__(self, p: np.ndarray, h: np.ndarray, F: np.ndarray, M: np.ndarray, c: float, exact: bool = False) -> None:
        self.h, self.A, self.F, self.M, self.exact = h, _factor(p, c), F, M.copy(), exact
        self.eye = np.eye(p.shape[1])
        self._refresh()

    def _refresh(self) -> None:
        self.P = np.linalg.inv(self.M)
        self.Q = _sandwich(self.h, self.A, self.P)
        self.R = _sandwich(self.h, self.A, self.P @ self.F @ self.P)

    def gains(self) -> np.ndarray:
        return _trace_solve(self.eye + self.Q, self.R)

    def losses(self) -> np.ndarray:
        return _trace_solve(self.eye - self.Q, self.R)

    def keep(self, rows: np.ndarray) -> None:
        """Track only the candidates at ``rows`` from now on."""
        self.h, self.A, self.Q, self.R = self.h[rows], self.A[rows], self.Q[rows], self.R[rows]

    def objective(self) -> float:
        """``tr(M⁻¹ F)``, solved directly."""
        return float(np.trace(np.linalg.solve(self.M, self.F)))

    def change(self, i: int, sign: float) -> None:
        """Add (``sign=+1``) or remove (``-1``) candidate ``i``'s information."""
        V = np.kron(self.A[i], self.h[i][:, None])
        self.M += sign * (V @ V.T)
        if self.exact:
            self._refresh()
            return
        C = sign * np.linalg.inv(self.eye + sign * self.Q[i])
        U = self.P @ V
        FU = self.F @ U
        Z = _left(self.h, self.A, U)
        Y = _left(self.h, self.A, self.P @ FU)
        Zt = Z.transpose(0, 2, 1)
        ZC = _times(Z, C)
        YCZ = _times(Y, C) @ Zt
        self.Q -= ZC @ Zt
        self.R -= YCZ + YCZ.transpose(0, 2, 1) - _times(ZC, U.T @ FU) @ ZC.transpose(0, 2, 1)
        self.P -= U @ C @ U.T
        self.P = 0.5 * (self.P + self.P.T)


def _bait_full(
    p: np.ndarray, h: np.ndarray, pL: np.ndarray, hL: np.ndarray, budget: int, n_forward: int, reg: float, keys: np.ndarray, exact: bool = False
) -> tuple[list[int], list[float]]:
    """Exact BAIT; returns the kept picks (rows, forward order) and their forward gains.

    The Woodbury updates' running objective is checked at the end against ``tr(M⁻¹ F)`` solved
    directly; if they differ by more than 1e-6 of it (a ridge far below the information, whose
    updates cancel all their digits), the selection is run again with ``exact`` state.
    """
    c = len(pL) + budget
    h, hL = h.astype(np.float64), hL.astype(np.float64)
    F = fisher_sum(p, h) / len(p)
    M = reg * np.eye(F.shape[0]) + fisher_sum(pL, hL) / c
    state = _FullFisher(p, h, F, M, c, exact)
    tracked = start = float(np.einsum("ij,ji->", state.P, F))  # tr(M⁻¹ F), P fresh from M
    free = np.ones(len(p), dtype=bool)
    picks, gains = [], []
    for _ in range(n_forward):
        g = np.where(free, state.gains(), -np.inf)
        i = argmax_tied(g, keys)
        picks.append(i)
        gains.append(g[i])
        tracked -= g[i]
        free[i] = False
        state.change(i, +1.0)
    rows = np.asarray(picks)
    state.keep(rows)
    alive = np.ones(len(rows), dtype=bool)
    for _ in range(n_forward - budget):
        loss = np.where(alive, state.losses(), np.inf)
        j = argmax_tied(-loss, keys[rows])
        tracked += loss[j]
        alive[j] = False
        state.change(j, -1.0)
    final = state.objective()
    if not exact and not abs(tracked - final) <= 1e-6 * final + 1e-12 * start:
        return _bait_full(p, h, pL, hL, budget, n_forward, reg, keys, exact=True)
    return rows[alive].tolist(), np.asarray(gains)[alive].tolist()


def _bait_diagonal(
    p: np.ndarray, h: np.ndarray, pL: np.ndarray, hL: np.ndarray, budget: int, n_forward: int, reg: float, keys: np.ndarray
) -> tuple[list[int], list[float]]:
    """BAIT with diagonal Fisher matrices; returns what :func:`_bait_full` does."""
    c = len(pL) + budget
    s, t = p * (1.0 - p), np.square(h, dtype=np.float64)  # I(x) has diagonal s_x ⊗ t_x
    f = s.T @ t / len(p)
    m = reg + (pL * (1.0 - pL)).T @ np.square(hL, dtype=np.float64) / c

    def gains(idx: np.ndarray) -> np.ndarray:  # Σ f (1/m - 1/(m + a)) = Σ f a / (m (m + a))
        a = s[idx, :, None] * t[idx, None, :] / c
        return np.einsum("kd,nkd->n", f, a / (m * (m + a)))

    # Lazy greedy: adding information only shrinks every gain (the objective is submodular),
    # so stale gains are upper bounds and only the candidates that reach the top are recomputed.
    rows = max(1, _BLOCK // f.size)
    g0 = np.concatenate([gains(np.arange(a, min(a + rows, len(p)))) for a in range(0, len(p), rows)])
    heap = list(zip((-g0).tolist(), [-k for k in keys.tolist()], range(len(p))))
    heapq.heapify(heap)
    stamp = np.zeros(len(p), dtype=np.int64)
    picks, picked_gains = [], []
    for step in range(n_forward):
        while stamp[heap[0][2]] != step:
            stale = []
            while heap and len(stale) < 32 and stamp[heap[0][2]] != step:
                stale.append(heapq.heappop(heap))
            idx = np.asarray([e[2] for e in stale])
            stamp[idx] = step
            for (_, nk, i), g in zip(stale, gains(idx).tolist()):
                heapq.heappush(heap, (-g, nk, i))
        neg_g, _, i = heapq.heappop(heap)
        picks.append(i)
        picked_gains.append(-neg_g)
        m = m + s[i, :, None] * t[i, None, :] / c
    rows = np.asarray(picks)
    alive = np.ones(len(rows), dtype=bool)
    a = s[rows, :, None] * t[rows, None, :] / c
    for _ in range(n_forward - budget):
        loss = np.einsum("kd,nkd->n", f, a / (m * (m - a)))
        j = argmax_tied(np.where(alive, -loss, -np.inf), keys[rows])
        alive[j] = False
        m = m - a[j]
    return rows[alive].tolist(), np.asarray(picked_gains)[alive].tolist()


class BAIT(Strategy):
    """BAIT: greedy forward-backward selection of Fisher information on the last layer.

    With ``I(x) = (diag(p_x) - p_x p_xᵀ) ⊗ h_x h_xᵀ`` (the last layer's Fisher at ``x``, expected
    over ``y ~ p``), ``F`` the pool's mean Fisher and ``M(B) = λ I + (Σ_{x ∈ S ∪ B} I(x)) / (|S| + b)``,
    BAIT minimizes ``tr(M(B)⁻¹ F)``: it greedily adds ``oversample·b`` pool samples, then greedily
    removes the ones whose loss hurts least until ``b`` remain. Scores are each pick's gain when
    added. Pool order does not matter (ties go to the generator's per-id keys).

    Parameters
    ----------
    fisher : {"auto", "full", "diagonal"}
        "full": exact, with D x D matrices (D = K·d) updated by rank-K Woodbury steps and K x K
        factors per candidate: O(D² + N·(K² + d)) memory, O(N·D² + b·N·K²(d + K)) time. The
        objective the steps track is checked against ``tr(M⁻¹ F)`` solved at the end; where the
        steps lost its digits (a ridge far below the information: ``reg`` 1e-5 with unit
        features), the query runs again with everything recomputed from ``M`` after each step
        (O(D³ + N·K²·d²) per step).
        "diagonal": an approximation that keeps only the diagonals of the Fisher matrices; its
        objective is then submodular, so lazy greedy finds the same picks as plain greedy while
        recomputing few gains: O(N·(K + d)) memory, O(N·D + b²·D) time plus the recomputed
        gains (O(D) each). "auto" (default): "full" if ``K·d <= max_dim``, else "diagonal".
    oversample : float
        Forward steps per query sample (2, as in the paper); 1 skips the backward pass.
    reg : float
        λ, the ridge on ``M`` (> 0).
    max_dim : int
        Largest ``K·d`` for the full Fisher (2048: 32 MB per D x D matrix).
    """

    name = "bait"
    outputs = ("probs", "head_features")
    labeled = ("labeled_outputs",)

    def __init__(self, fisher: str = "auto", oversample: float = 2.0, reg: float = 1.0, max_dim: int = 2048) -> None:
        if fisher not in ("auto", "full", "diagonal"):
            raise ValueError(f"fisher must be 'auto', 'full' or 'diagonal', got {fisher!r}")
        if not np.isfinite(oversample) or oversample < 1:
            raise ValueError(f"oversample must be a finite number >= 1, got {oversample}")
        if not np.isfinite(reg) or reg <= 0:
            raise ValueError(f"reg must be a finite number > 0, got {reg}")
        if not is_integer(max_dim) or max_dim < 1:
            raise ValueError(f"max_dim must be a positive integer, got {max_dim!r}")
        self.fisher = fisher
        self.oversample = float(oversample)
        self.reg = float(reg)
        self.max_dim = int(max_dim)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "fisher": self.fisher, "oversample": self.oversample, "reg": self.reg, "max_dim": self.max_dim}

    def select(self, chunks: Chunks, stats: Mapping[str, Any], budget: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ids, arrays = gather(chunks, ["probs", "features"])
        p, h = arrays.pop("probs"), arrays.pop("features")
        pL, hL = np.asarray(stats["labeled_probs"]), np.asarray(stats["labeled_features"])
        dim = p.shape[1] * h.shape[1]
        if self.fisher == "full" and dim > self.max_dim:
            raise ValueError(f"fisher='full' needs K·d <= max_dim, got K·d = {dim} > {self.max_dim}: raise max_dim or use fisher='diagonal'")
        full = self.fisher == "full" or (self.fisher == "auto" and dim <= self.max_dim)
        budget = min(budget, len(ids))
        if budget <= 0:
            return ids[:0], np.empty(0)
        n_forward = min(len(ids), math.ceil(self.oversample * budget))
        keys = tie_keys(ids, draw_salt(rng))
        run = _bait_full if full else _bait_diagonal
        picks, gains = run(p, h, pL, hL, budget, n_forward, self.reg, keys)
        return ids[picks], np.asarray(gains)
