"""Cost of scoring a pool with dynamicAL, against plain inference and per-sample gradients.

For each model, on the same random pool in one run (CPU):
  (a) inference     forward pass over the pool (no_grad, eval mode), in batches of 16 to 1,024
                    images: the fastest batch size is reported (for ResNet-18 and the small CNN
                    batches that keep activations in cache run about 2x faster than 1,024)
  (b) last          dynamicAL params="last": forward + closed-form last-layer score + top-b
  (c) all           dynamicAL params="all": dynal's per-layer per-sample gradient statistics
  (d) vmap          per-sample gradients materialized with torch.func (vmap over grad), then
                    the same two statistics (norm and dot with G_S)
  (e) opacus        per-sample gradients materialized by opacus' GradSampleModule (only if
                    opacus is importable, which dynal does not need, and only for models
                    without BatchNorm: opacus rejects BatchNorm and records only in train mode)
  (f) backpack      per-sample gradients materialized by backpack-for-pytorch's BatchGrad (only
                    if backpack is importable, which dynal does not need either)
Throughput is pool images per second; memory is the sampled peak growth of resident memory.
The labeled-set statistics (G_S) are computed once beforehand: they cost one pass over the
labeled set, not the pool, and are the same for every query size.
A second table runs (c) at two pool sizes and two budgets: its peak memory should not change.

Usage: python benchmarks/engine_speed.py [--threads 2] [--rounds 5] [--out benchmarks/engine_speed.md]
(e) and (f) need `pip install opacus backpack-for-pytorch` in the environment; they are skipped otherwise.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import multiprocessing
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing, contextmanager

import numpy as np
import torch
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from dynal.engine import Context, labeled_stats, pool_chunks
from dynal.engine.param_grads import ParamGradStats
from dynal.models import model_factory
from dynal.resources import Measure
from dynal.strategies import DynamicAL

# name, model, params, input shape, pool size, pool size for the materializing paths, chunk
CASES = [
    ("MLP 784-256-10", "mlp", {"hidden": [256]}, (1, 28, 28), 8192, 2048, 256),
    ("MLP 784-256-10", "mlp", {"hidden": [256]}, (1, 28, 28), 8192, 2048, 1024),  # the library's default chunk
    ("small CNN", "cnn", {}, (1, 28, 28), 2048, 256, 128),
    # pools large enough that the once-per-query work of (c) (the first batch's check against
    # one-sample autograd, 45-120 ms) is a few percent, as it is less on real pools
    # sub-pools of 4 and 2 chunks of 16 for the materializing paths: with 2 and 1 their
    # once-per-call work made vmap's images/s about 10% lower than on 128 images
    ("ResNet-18 w0.5", "resnet18", {"width": 0.5}, (3, 32, 32), 512, 64, 64),
    ("ResNet-18 w1", "resnet18", {"width": 1.0}, (3, 32, 32), 256, 32, 64),
]
NOTES = "<!-- notes: kept when the tables above are rewritten -->"
MEMORY_CASE = 3  # ResNet-18 w0.5: (c) at several pool sizes and budgets
BUDGET = 100
N_LABELED = 64


def _model(name: str, params: dict, shape: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = model_factory(name, shape, 10, **params)()
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        model(torch.randn(32, *shape))
    return model.eval()


def inference(model, X, chunk):
    with torch.no_grad():
        for i in range(0, len(X), chunk):
            model(torch.from_numpy(X[i : i + chunk]))


def query(model, X, chunk, strategy, stats, budget=BUDGET):
    """The pool pass and selection of one query, given the labeled-set statistics."""
    ctx = Context(model, stats, torch.Generator(), strategy.output_options())
    chunks = pool_chunks(model, X, np.arange(len(X)), strategy.outputs, ctx, chunk)
    with closing(chunks):
        return strategy.select(chunks, stats, budget, np.random.default_rng(0))


def vmap_path(model, X, chunk, G):
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, {**p, **buffers}, (x[None],)), y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    out = []
    for i in range(0, len(X), chunk):
        x = torch.from_numpy(X[i : i + chunk])
        with torch.no_grad():
            y = model(x).argmax(1)
        g = per_sample(params, x, y)
        norm = sum(v.flatten(1).pow(2).sum(1) for v in g.values())
        cross = sum(v.flatten(1) @ G[n].flatten() for n, v in g.items())
        out.append(norm + 2 * cross)
    return torch.cat(out)


@contextmanager
def _quiet():
    """Silence the libraries' warnings (backward hooks on modules whose inputs need no gradient)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def opacus_path(model, X, chunk, G):
    from opacus import GradSampleModule

    # opacus records activations only in train mode, and rejects BatchNorm: run it only on
    # models without BatchNorm or dropout, where train mode computes the same function
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.train()
    out = []
    with _quiet():
        for i in range(0, len(X), chunk):
            logits = gsm(torch.from_numpy(X[i : i + chunk]))
            F.cross_entropy(logits, logits.argmax(1), reduction="sum").backward()
            norm = sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in model.parameters())
            cross = sum(p.grad_sample.flatten(1) @ G[n].flatten() for n, p in model.named_parameters())
            out.append(norm + 2 * cross)
            gsm.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.grad_sample = None
    gsm._close()
    model.eval()
    return torch.cat(out)


def backpack_model(model):
    """A copy of the model extended for backpack (its graph converted to backpack's modules)."""
    from backpack import extend

    with _quiet():
        return extend(copy.deepcopy(model), use_converter=True).eval()


def backpack_path(ext, X, chunk, G):
    from backpack import backpack
    from backpack.extensions import BatchGrad

    params = list(ext.parameters())
    Gs = list(G.values())  # the converted copy keeps the parameter order, not the names
    assert [p.shape for p in params] == [g.shape for g in Gs]
    out = []
    with _quiet():
        for i in range(0, len(X), chunk):
            logits = ext(torch.from_numpy(X[i : i + chunk]))
            with backpack(BatchGrad()):
                F.cross_entropy(logits, logits.argmax(1), reduction="sum").backward()
            norm = sum(p.grad_batch.flatten(1).pow(2).sum(1) for p in params)
            cross = sum(p.grad_batch.flatten(1) @ g.flatten() for p, g in zip(params, Gs))
            out.append(norm + 2 * cross)
            for p in params:
                p.grad, p.grad_batch = None, None
    return torch.cat(out)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


PATHS = ("inference", "last", "all", "vmap", "opacus", "backpack")
INFERENCE_BATCHES = (16, 32, 64, 128, 256, 1024)
MATERIALIZING = ("vmap", "opacus", "backpack")


def case_data(case: int, threads: int, n_pool: int | None = None) -> tuple:
    """One case's model, random pool ``X`` (``n_pool`` images, default the case's), labeled
    set ``X_lab``, ``y_lab`` and chunk, with torch on ``threads`` threads."""
    torch.set_num_threads(threads)
    _, name, params, shape, n_default, _, chunk = CASES[case]
    rng = np.random.default_rng(0)
    model = _model(name, params, shape)
    X = rng.normal(size=(n_pool or n_default, *shape)).astype(np.float32)
    X_lab = rng.normal(size=(N_LABELED, *shape)).astype(np.float32)
    return model, X, X_lab, rng.integers(0, 10, N_LABELED), chunk


def _setup(case: int, threads: int, n_pool: int | None = None, budget: int = BUDGET) -> dict:
    """The model, pool and labeled statistics of one case, and a callable per available path."""
    model, X, X_lab, y_lab, chunk = case_data(case, threads, n_pool)
    name, n, n_mat = CASES[case][1], len(X), CASES[case][5]
    X_mat = X[:n_mat]
    mat_chunk = 16 if name == "resnet18" else chunk
    stats = {p: labeled_stats(model, DynamicAL(params=p).labeled, X_lab, y_lab, batch_size=chunk) for p in ("last", "all")}
    G = stats["all"]["G_S"]
    runs = {
        **{f"inference/{b}": (lambda b=b: inference(model, X, b)) for b in INFERENCE_BATCHES if b <= n},
        "last": lambda: query(model, X, chunk, DynamicAL(params="last"), stats["last"], budget),
        "all": lambda: query(model, X, chunk, DynamicAL(params="all"), stats["all"], budget),
        "vmap": lambda: vmap_path(model, X_mat, mat_chunk, G),
        "opacus": lambda: opacus_path(model, X_mat, mat_chunk, G),
    }
    if not _importable("opacus") or _has_batchnorm(model):
        del runs["opacus"]
    if _importable("backpack"):
        ext = backpack_model(model)
        runs["backpack"] = lambda: backpack_path(ext, X_mat, mat_chunk, G)
    inference(model, X[: 2 * chunk], chunk)  # warm-up
    # the materializing paths run on a sub-pool: their times are scaled to the full pool
    scale = {p: (n / len(X_mat) if p in MATERIALIZING else 1.0) for p in runs}
    own = ParamGradStats(model, G)

    def reference() -> torch.Tensor:
        """dynal's scores (c) on the sub-pool, which the materializing paths must reproduce."""
        parts = [own(torch.from_numpy(X_mat[i : i + chunk])) for i in range(0, len(X_mat), chunk)]
        return torch.cat([norm + 2 * cross for norm, cross in parts])

    return {"runs": runs, "scale": scale, "reference": reference}


def check_agreement(setup: dict, rtol: float = 1e-4) -> None:
    """Fail unless every materializing path gives dynal's scores on the sub-pool."""
    ref = setup["reference"]()
    for path in MATERIALIZING:
        if path in setup["runs"]:
            diff = (setup["runs"][path]().double() - ref).abs().max() / ref.abs().max()
            if not diff <= rtol:
                raise AssertionError(f"{path} scores differ from dynal's by {float(diff):.1e} (relative)")


def timings(case: int, threads: int, rounds: int) -> dict[str, float | None]:
    """Best seconds of each path over ``rounds`` rounds, the paths interleaved in each round,
    so that a slow spell of the shared machine hits every path alike. Timed with the clock
    alone: the memory sampler's thread would take turns on the two cores (memory is measured
    in separate runs)."""
    setup = _setup(case, threads)
    check_agreement(setup)
    best = best_times(setup["runs"], setup["scale"], rounds)
    return {**{p: best.get(p) for p in PATHS}, "inference": best["inference"], "inference_path": best["inference_path"]}


def best_times(runs: dict, scale: dict[str, float], rounds: int) -> dict:
    """Best seconds of each run (times its scale) over ``rounds`` interleaved rounds, plus
    ``inference``, the best of the ``inference/<batch>`` runs, and ``inference_path``, its name."""
    best = {p: float("inf") for p in runs}
    for _ in range(rounds):
        for path, run in runs.items():
            start = time.perf_counter()
            run()
            best[path] = min(best[path], (time.perf_counter() - start) * scale[path])
    fastest = min((p for p in best if p.startswith("inference/")), key=best.get)
    return {**best, "inference": best[fastest], "inference_path": fastest}


def peak_memory(case: int, path: str, threads: int, n_pool: int | None = None, budget: int = BUDGET) -> tuple[float, int] | None:
    """Seconds and sampled peak resident-memory growth of one run of one path, in a fresh process."""
    setup = _setup(case, threads, n_pool, budget)
    if path not in setup["runs"]:
        return None
    with Measure() as m:
        setup["runs"][path]()
    return m.seconds, m.peak_bytes


def setting(args: argparse.Namespace) -> str:
    """The benchmarks' common setting, the first words of their tables' preamble."""
    return f"torch {torch.__version__}, {args.threads} threads, {platform.machine()}; budget b = {BUDGET}, labeled set M = {N_LABELED}"


def bench_cli(doc: str, rounds: int) -> tuple[argparse.Namespace, ProcessPoolExecutor]:
    """The benchmarks' options (--threads, --rounds, --out), and a pool running each task in a
    fresh process."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved timing rounds per model (best is kept)")
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
    return parser.parse_args(), pool


def measure_case(pool: ProcessPoolExecutor, timings: Callable, peak_memory: Callable, case: int, paths: Sequence[str], args: argparse.Namespace) -> tuple[dict, list[int]]:
    """One model's best times (``timings`` in a fresh process) and each path's peak memory
    (``peak_memory`` in a fresh process per path; inference at its fastest batch size)."""
    t = pool.submit(timings, case, args.threads, args.rounds).result()
    mems = [pool.submit(peak_memory, case, t["inference_path"] if p == "inference" else p, args.threads).result() for p in paths]
    return t, mems


def main() -> None:
    args, pool = bench_cli(__doc__, rounds=5)
    lines = [
        f"{setting(args)}. Times: per model one fresh process runs the paths interleaved, {args.rounds} rounds, "
        "and keeps each path's best (wall clock, no memory sampling); (a) is the fastest plain inference over batches of "
        f"{', '.join(map(str, INFERENCE_BATCHES))} images, (b) and (c) run in the given chunks; (d), (e) and (f) run on a sub-pool, are scaled to the full pool, and are checked "
        "to give (c)'s scores there to 1e-4 relative. Memory: "
        "one run of each path in its own fresh process.",
        "",
        "| model | params | pool | sub-pool (d)-(f) | chunk | (a) inference img/s (batch) | (b) last img/s | (c) all img/s | (d) vmap img/s | (e) opacus img/s "
        "| (f) backpack img/s | (b)/(a) time | (c)/(a) time | (d)/(c) time | (e)/(c) time | (f)/(c) time "
        "| peak MB (a) / (b) / (c) / (d) / (e) / (f) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, (label, name, params, shape, n_pool, n_mat, chunk) in enumerate(CASES):
        t, mems = measure_case(pool, timings, peak_memory, case, PATHS, args)
        n_params = sum(p.numel() for p in _model(name, params, shape).parameters())
        rate = lambda p: f"{n_pool / t[p]:,.0f}" if t[p] else "-"  # noqa: E731
        ratio = lambda p, q, f: f"{t[p] / t[q]:.{f}f}x" if t[p] and t[q] else "-"  # noqa: E731
        mem = " / ".join(f"{r[1] / 2**20:.0f}" if r else "-" for r in mems)
        lines.append(
            f"| {label} | {n_params / 1e6:.2f}M | {n_pool} | {n_mat} | {chunk} | {rate('inference')} ({t['inference_path'].split('/')[1]}) | {rate('last')} | {rate('all')} | "
            f"{rate('vmap')} | {rate('opacus')} | {rate('backpack')} | {ratio('last', 'inference', 2)} | "
            f"{ratio('all', 'inference', 2)} | {ratio('vmap', 'all', 1)} | {ratio('opacus', 'all', 1)} | "
            f"{ratio('backpack', 'all', 1)} | {mem} |"
        )
        print(lines[-1], flush=True)
    lines += ["", "Peak memory of (c) on ResNet-18 w0.5 against pool size N and budget b (one run each, fresh process):", "",
              "| N | b | seconds | peak MB |", "|---|---|---|---|"]
    for n_pool in (128, 512):
        for budget in (10, 100):
            seconds, peak = pool.submit(peak_memory, MEMORY_CASE, "all", args.threads, n_pool, budget).result()
            lines.append(f"| {n_pool} | {budget} | {seconds:.1f} | {peak / 2**20:.0f} |")
            print(lines[-1], flush=True)
    finish(args, "engine_speed", "Engine speed and memory", lines)


def finish(args: argparse.Namespace, script: str, title: str, lines: list[str]) -> None:
    """Print a benchmark's tables and, with ``--out``, write them with the command that made them."""
    text = "\n".join(lines)
    print(text)
    if args.out:
        command = f"python benchmarks/{script}.py --threads {args.threads} --rounds {args.rounds} --out {args.out}"
        write_report(args.out, title, command, text)


def write_report(path: str, title: str, command: str, text: str) -> None:
    """Write a benchmark's tables under a title and the command that produced them, keeping the
    hand-written notes below the marker line of the file's previous version."""
    notes = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if NOTES in old:
            notes = "\n" + old[old.index(NOTES):]
    with open(path, "w") as f:
        f.write(f"# {title}\n\nCommand: `{command}`\n\n{text}\n{notes}")


if __name__ == "__main__":
    main()
