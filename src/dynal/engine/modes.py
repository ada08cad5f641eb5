"""Running a user's model: in eval mode without leaving it there, in forward passes sized to the cache,
with hooks that do not outlive the pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode, and give each back its own mode afterwards
    (a model mixing train- and eval-mode parts keeps the mix)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


# Largest layer output, in bytes, of one forward pass of the pool scan (and of the gradient
# passes of params="all"). Measured on ResNet-18 (widths 0.5 and 1) and the small CNN: forward
# passes of 16-128 images, whose largest layer output is 2-13 MB, ran 2.0-2.3x faster than
# chunks of 1,024 images, the fastest between 4 and 13 MB depending on the model and the
# machine's load; for the gradient passes, see benchmarks/layer_coverage.md.
_ACTIVATION_BYTES = 1 << 23


def forward_batch(model: nn.Module, x: torch.Tensor, run: Callable[[torch.Tensor], Any] | None = None) -> int:
    """Samples per forward pass such that the model's largest layer output stays near 8 MB.

    Measured with ``run`` (default ``model.features``; the head's output is small) on two samples
    of ``x`` in eval mode, with a forward hook on every module (TorchScript modules, which take
    no hooks, are not measured). Returns ``len(x)``, one pass for all of ``x``, for a model whose eval-mode
    output depends on its batch (BatchNorm without running statistics) or that the measurement
    cannot run.
    """
    whole = max(1, len(x))
    if len(x) == 0 or any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is None for m in model.modules()):
        return whole
    probe = x[:2]
    largest = probe.numel() * probe.element_size()

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        nonlocal largest
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                largest = max(largest, t.numel() * t.element_size())

    handles: list[RemovableHandle] = []
    try:
        with removed_on_exit(handles):
            for m in model.modules():
                if not isinstance(m, torch.jit.ScriptModule):
                    handles.append(m.register_forward_hook(hook))  # one by one: a failure removes those made
            with torch.no_grad(), eval_mode(model):
                (run or model.features)(probe)
    except Exception:  # noqa: BLE001 - any model the measurement cannot run keeps one pass per chunk
        return whole
    return max(1, _ACTIVATION_BYTES * len(probe) // largest)


@contextmanager
def removed_on_exit(handles: Sequence[RemovableHandle]) -> Iterator[None]:
    """Remove the hooks ``handles`` (a list may grow inside the block) on leaving the block,
    however it is left."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def equal_parts(x: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """``x`` split along its first axis into the fewest equal parts (up to one sample) of at
    most ``size`` samples, so no small remainder pass follows the full ones."""
    return x.tensor_split(-(-len(x) // size)) if len(x) > size else (x,)
