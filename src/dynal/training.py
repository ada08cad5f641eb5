"""Training on the labeled set and evaluation on held-out data."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dynal.data.arrays import check_labels
from dynal.engine.modes import forward_batch
from dynal.validation import check_field_types


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained each round.

    Attributes
    ----------
    epochs : passes over the labeled set (a fixed schedule; nothing is chosen on the test set)
    batch_size, lr, weight_decay, momentum : optimizer settings (momentum for SGD only)
    optimizer : "adam" or "sgd"
    warm_start : keep the previous round's weights (a new optimizer each round) instead of
        re-initializing the model
    val_fraction : if > 0, hold out this fraction of the labeled set and keep the epoch with the
        best validation accuracy; the held-out samples are not trained on
    """

    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    warm_start: bool = False
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class FitResult:
    """What one call to :func:`fit` did: its time, its epochs, ``final_loss`` (the mean training
    loss of the epoch whose weights are kept: the last, or the best on the validation hold-out),
    the hold-out's accuracy and every epoch's loss."""

    seconds: float
    epochs: int
    final_loss: float
    val_accuracy: float | None = None
    history: list[float] = field(default_factory=list)


def seed_from(rng: np.random.Generator) -> int:
    """Draw a torch seed from the experiment's generator."""
    return int(rng.integers(2**62))


def build_model(factory: Callable[[], nn.Module], rng: np.random.Generator) -> nn.Module:
    """Build a model with weights drawn from ``rng`` (torch's global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_from(rng))
        return factory()


def fit(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    rng: np.random.Generator,
) -> FitResult:
    """Train ``model`` in place on ``(X, y)`` with cross-entropy for ``config.epochs`` epochs.

    Shuffling, dropout and the validation hold-out all draw from ``rng``, so the same
    generator state gives the same weights. The hold-out takes ``val_fraction`` of the samples,
    at least one and never all. A batch of one sample (``batch_size=1``, or a labeled set of
    one) runs the BatchNorm layers on their running statistics, since a batch's own statistics
    need more than one value per channel.
    """
    y = check_labels(y, getattr(getattr(model, "head", None), "out_features", None), what="y")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels")
    if len(X) == 0:
        raise ValueError("cannot train on an empty labeled set")
    start = time.perf_counter()
    train_pos = np.arange(len(X))
    val_pos = np.empty(0, dtype=np.int64)
    if config.val_fraction > 0:
        if len(X) < 2:
            warnings.warn("val_fraction needs two labeled samples or more: training without a hold-out", stacklevel=2)
        else:
            n_val = min(max(int(round(config.val_fraction * len(X))), 1), len(X) - 1)
            perm = rng.permutation(len(X))
            val_pos, train_pos = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    Xt = torch.from_numpy(np.ascontiguousarray(X[train_pos]))
    yt = torch.from_numpy(np.asarray(y[train_pos], dtype=np.int64))
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    best_acc, best_state, best_epoch = -1.0, None, -1
    history: list[float] = []
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_from(rng))
        for _ in range(config.epochs):
            model.train()
            order = torch.from_numpy(rng.permutation(len(Xt)))
            total = 0.0
            batches = list(order.split(config.batch_size))
            if config.batch_size > 1 and len(batches) > 1 and len(batches[-1]) == 1:  # no lone last sample
                batches[-2:] = [torch.cat(batches[-2:])]
            for batch in batches:
                for m in norms:
                    m.train(len(batch) > 1)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(Xt[batch]), yt[batch], reduction="sum")
                (loss / len(batch)).backward()
                opt.step()
                total += loss.item()
            history.append(total / len(Xt))
            if len(val_pos):
                acc = evaluate(model, X[val_pos], y[val_pos])
                if acc > best_acc:
                    best_acc, best_epoch = acc, len(history) - 1
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(
        seconds=time.perf_counter() - start,
        epochs=config.epochs,
        final_loss=history[best_epoch],  # the epoch whose weights are kept
        val_accuracy=best_acc if len(val_pos) else None,
        history=history,
    )


@torch.no_grad()
def predict_proba(model: nn.Module, X: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Class probabilities in eval mode, (N, K) float32, ``batch_size`` samples per forward pass
    (default: as many as keep the largest layer output near 8 MB, measured with a forward pass
    on two samples, see :func:`dynal.engine.modes.forward_batch`)."""
    model.eval()
    if batch_size is None:
        batch_size = forward_batch(model, torch.from_numpy(np.ascontiguousarray(X[:1024])), run=model)
    out = [F.softmax(model(torch.from_numpy(np.ascontiguousarray(X[i : i + batch_size]))), dim=1) for i in range(0, len(X), batch_size)]
    return torch.cat(out).numpy()


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray, batch_size: int | None = None) -> float:
    """Accuracy of ``model`` on ``(X, y)`` in eval mode (``batch_size`` as in :func:`predict_proba`)."""
    y = check_labels(y, what="y")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels")
    if len(X) == 0:
        raise ValueError("cannot evaluate on an empty set")
    return float((predict_proba(model, X, batch_size).argmax(1) == y).mean())
