"""Cost of dynamicAL params="all" on models beyond the engine table (benchmarks/engine_speed.py):
sequence, text, tabular, depthwise-separable and 3-D convolutional models, whose Embedding,
EmbeddingBag, LayerNorm, GroupNorm, Conv1d, BatchNorm1d, grouped (depthwise) Conv2d and Conv3d
layers have dynal's per-layer fast path, and five models with layers outside it: transformers
built from nn.TransformerEncoderLayer (nn.MultiheadAttention), with the samples first and, as
torch's default, second (batch_first=False), bidirectional LSTM and GRU text classifiers, and a
ResNet-18 with a user-defined layer (a learned per-channel scale after each block).

For each model, on the same random pool (CPU):
  (a) inference     forward pass over the pool (no_grad, eval mode), in batches of 16 to 256
                    samples: the fastest batch size is reported
  (c) all           dynal's ParamGradStats (every layer of the first six models on the fast path;
                    in the last five, attention, the LSTM and the GRU take their closed form,
                    the user layer torch.func on its own module)
  (g) general       the first six models: the layers named above on dynal's general path
                    (torch.func's vmap over grad for their parameters, on the whole model), as
                    before they had a fast path; for the first three models also passes split
                    only to bound convolutions' per-sample gradients, not by layer output size,
                    as before that split existed. The last four: the layers outside the fast
                    path on the whole model, as before they replayed their own module; for the
                    sequence-first transformer also every layer but the head, as before layers
                    with the samples on another axis than the first kept the fast path; the
                    LSTM and the GRU replay their own module, as before they had a closed form
                    (the GRU one sample at a time: torch.func cannot vmap it)
  (d) vmap          per-sample gradients of all parameters materialized with torch.func ("-"
                    where torch.func cannot run the model, as for the GRU)
(c) and (g) run in the library's default chunks of 1,024 (which ParamGradStats splits into
passes whose largest layer output is near 8 MB); (c), (g) and (d) (where it runs) are checked to give the same
scores to 1e-4 relative. Times: the paths
interleaved in one fresh process per model, the best of the rounds; memory: the sampled peak
growth of resident memory of one run of each path in its own fresh process.

Usage: python benchmarks/layer_coverage.py [--threads 2] [--rounds 3] [--out benchmarks/layer_coverage.md]
"""

from __future__ import annotations

import platform
import warnings

import numpy as np
import torch
from engine_speed import bench_cli, best_times, finish, measure_case, vmap_path
from torch import nn
from torch.nn import functional as F

from dynal.engine.param_grads import ParamGradStats, param_grad_sum
from dynal.models import ResNet18
from dynal.models.resnet import BasicBlock
from dynal.resources import Measure

NEW_LAYERS = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.Conv1d, nn.BatchNorm1d)
N_LABELED = 64
CHUNK = 1024  # the library's default chunk
INFERENCE_BATCHES = (16, 32, 64, 128, 256)


class Block(nn.Module):
    """A pre-norm transformer block: self-attention from Linear projections, then an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TextTransformer(nn.Module):
    """Token ids (stored as float32, as dynal stores inputs) -> embeddings plus fixed sinusoidal
    positions -> blocks -> mean. (A learned position table, ``nn.Embedding`` of ``arange(T)``,
    sees the positions rather than the samples, so its parameters take the general path.)"""

    def __init__(self, vocab: int, length: int, dim: int = 128, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        angle = torch.arange(length)[:, None] / 10_000 ** (torch.arange(0, dim, 2) / dim)
        self.register_buffer("position", torch.cat([angle.sin(), angle.cos()], 1))
        self.blocks = nn.Sequential(*(Block(dim, 4) for _ in range(blocks)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x.long()) + self.position)).mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def series_cnn(channels: int) -> nn.Module:
    """A 1-D CNN for multichannel time series, with BatchNorm1d and GroupNorm."""
    return nn.Sequential(
        nn.Conv1d(channels, 64, 7, padding=3), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Conv1d(64, 64, 5, stride=2, padding=2), nn.GroupNorm(8, 64), nn.ReLU(),
        nn.Conv1d(64, 128, 3, stride=2, padding=1), nn.BatchNorm1d(128), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(128, 10),
    )


def tabular_mlp(features: int) -> nn.Module:
    """An MLP for tabular data with BatchNorm1d after each hidden layer."""
    return nn.Sequential(
        nn.Linear(features, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10),
    )


def separable_cnn() -> nn.Module:
    """A MobileNet-style CNN for 32 x 32 images: depthwise 3x3 then pointwise 1x1 convolutions,
    each followed by BatchNorm2d."""
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
    for c_in, c_out, stride in ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)):
        layers += [nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU()]
        layers += [nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


def volume_cnn() -> nn.Module:
    """A 3-D CNN for single-channel volumes (medical scans, say), with BatchNorm3d."""
    return nn.Sequential(
        nn.Conv3d(1, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
        nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.BatchNorm3d(32), nn.ReLU(),
        nn.Conv3d(32, 64, 3, stride=2, padding=1), nn.BatchNorm3d(64), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(64, 10),
    )


class BagOfWords(nn.Module):
    """Token ids (stored as float32) -> the mean of their embeddings (``nn.EmbeddingBag``) -> MLP."""

    def __init__(self, vocab: int, dim: int = 64) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean", padding_idx=0)
        self.mix, self.head = nn.Linear(dim, dim), nn.Linear(dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.mix(self.bag(x.long())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class AttentionTransformer(nn.Module):
    """Token ids -> embeddings plus fixed positions -> ``nn.TransformerEncoder`` (pre-norm
    ``nn.TransformerEncoderLayer``, whose ``nn.MultiheadAttention`` runs its projections inside
    one function, outside the per-layer fast path) -> mean; with ``batch_first=False`` every
    layer before the head runs position-major, (positions, samples, features)."""

    def __init__(self, vocab: int, length: int, dim: int = 128, blocks: int = 2, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        angle = torch.arange(length)[:, None] / 10_000 ** (torch.arange(0, dim, 2) / dim)
        self.register_buffer("position", torch.cat([angle.sin(), angle.cos()], 1))
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, activation="gelu", batch_first=batch_first, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_first:
            return self.head(self.norm(self.encoder(self.embed(x.long()) + self.position)).mean(1))
        return self.head(self.norm(self.encoder(self.embed(x.long().T) + self.position[:, None])).mean(0))


class RecurrentText(nn.Module):
    """Token ids -> embeddings -> bidirectional ``nn.LSTM`` (or ``nn.GRU``) -> mean over the positions."""

    def __init__(self, vocab: int, dim: int = 64, hidden: int = 128, cell: type[nn.Module] = nn.LSTM) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.rnn = cell(dim, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x.long()))[0].mean(1))


class ChannelScale(nn.Module):
    """A user-defined layer: a learned scale per channel (as LayerScale), a raw parameter."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma[:, None, None]


def scaled_resnet() -> nn.Module:
    """dynal's ResNet-18 (width 0.5) with a :class:`ChannelScale` after each basic block."""
    model = ResNet18((3, 32, 32), 10, width=0.5)
    layers = []
    for m in model.body:
        layers += [m, ChannelScale(m.conv2.out_channels)] if isinstance(m, BasicBlock) else [m]
    model.body = nn.Sequential(*layers)
    return model


def _new(m: nn.Module) -> bool:
    """A layer that took the general path before it had a fast one."""
    grouped_or_padded = isinstance(m, nn.Conv2d) and (m.groups > 1 or m.padding_mode != "zeros")
    return isinstance(m, (*NEW_LAYERS, nn.Conv3d, nn.EmbeddingBag)) or grouped_or_padded


# label, model, input maker (n, generator) -> float32 array, pool size, sub-pool of (d), whether
# (g) runs whole chunks (dynal before its passes were split by layer output size), and what (g)
# takes on the whole model: "new" layers (before they had a fast path), the parameters outside
# the fast path ("replayed", before they replayed their module), or those and every layer but
# the head ("sequence-first", before layers with the samples on a later axis had the fast path),
# or the modules with a closed form replaying their call ("closed form", before they had one)
TOKENS = lambda n, rng: np.where(np.arange(64) < 50, rng.integers(1, 30_000, (n, 64)), 0).astype(np.float32)  # noqa: E731
CASES = [
    ("transformer, vocabulary 30,000, 64 tokens", lambda: TextTransformer(30_000, 64), TOKENS, 512, 64, True, "new"),
    ("1-D CNN, 8 x 256 series", lambda: series_cnn(8), lambda n, rng: rng.normal(size=(n, 8, 256)).astype(np.float32), 1024, 128, True, "new"),
    ("tabular MLP + BatchNorm1d, 64 features", lambda: tabular_mlp(64), lambda n, rng: rng.normal(size=(n, 64)).astype(np.float32), 8192, 1024, True, "new"),
    ("depthwise-separable CNN, 3 x 32 x 32", separable_cnn, lambda n, rng: rng.normal(size=(n, 3, 32, 32)).astype(np.float32), 512, 64, False, "new"),
    ("bag of words, vocabulary 30,000, 64 tokens", lambda: BagOfWords(30_000), TOKENS, 4096, 256, False, "new"),
    ("3-D CNN, 1 x 16 x 32 x 32 volumes", volume_cnn, lambda n, rng: rng.normal(size=(n, 1, 16, 32, 32)).astype(np.float32), 256, 32, False, "new"),
    ("nn.TransformerEncoder (nn.MultiheadAttention), vocabulary 30,000, 64 tokens", lambda: AttentionTransformer(30_000, 64), TOKENS, 512, 64, False, "replayed"),
    ("nn.TransformerEncoder, sequence-first (batch_first=False), vocabulary 30,000, 64 tokens", lambda: AttentionTransformer(30_000, 64, batch_first=False), TOKENS, 512, 64, False, "sequence-first"),
    ("bidirectional LSTM (nn.LSTM), vocabulary 30,000, 64 tokens", lambda: RecurrentText(30_000), TOKENS, 512, 64, False, "closed form"),
    ("bidirectional GRU (nn.GRU), vocabulary 30,000, 64 tokens", lambda: RecurrentText(30_000, cell=nn.GRU), TOKENS, 512, 64, False, "closed form"),
    ("ResNet-18 w0.5 + a user-defined scale layer, 3 x 32 x 32", scaled_resnet, lambda n, rng: rng.normal(size=(n, 3, 32, 32)).astype(np.float32), 256, 32, False, "replayed"),
]
PATHS = ("inference", "all", "general", "vmap")


def _setup(case: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    _, make, draw, n, n_sub, whole_chunks, before = CASES[case]
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = make()
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        model(torch.from_numpy(draw(32, rng)))
    model.eval()
    X, X_lab, y_lab = draw(n, rng), draw(N_LABELED, rng), rng.integers(0, 10, N_LABELED)
    G = param_grad_sum(model, X_lab, y_lab, CHUNK)["G_S"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that names the general path's layers
        fast = ParamGradStats(model, G)
        general = ParamGradStats(model, G)
        general.per_module = False  # uncovered parameters on the whole model, as before
        if before == "new":
            general._plan(exclude=[name for name, m in model.named_modules() if _new(m)])
        elif before == "sequence-first":
            general._plan(exclude=[name for name, _ in general.covered if name != "head"])
        elif before == "closed form":
            fast(torch.from_numpy(X[:2]))  # the modules that take their closed form
            general.uncaptured.update(u.name for u in fast.units if u.capture)
        if whole_chunks:
            general.forward_batch = CHUNK  # passes split only for convolutions, as before

    def scores(stats: ParamGradStats, Xs: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = [stats(torch.from_numpy(Xs[i : i + CHUNK])) for i in range(0, len(Xs), CHUNK)]
        return torch.cat([norm + 2 * cross for norm, cross in parts])

    def inference(batch: int) -> None:
        with torch.no_grad():
            for i in range(0, n, batch):
                model(torch.from_numpy(X[i : i + batch]))

    runs = {
        **{f"inference/{b}": (lambda b=b: inference(b)) for b in INFERENCE_BATCHES},
        "all": lambda: scores(fast, X),
        "general": lambda: scores(general, X),
        "vmap": lambda: vmap_path(model, X[:n_sub], 16, G),
    }
    try:
        vmap_path(model, X[:2], 2, G)
    except RuntimeError:  # a layer torch.func cannot batch (nn.GRU): no column (d)
        del runs["vmap"]
    scale = {p: n / n_sub if p == "vmap" else 1.0 for p in runs}

    def check() -> None:
        """Fail unless (g) and (d) (where it runs) give (c)'s scores on the sub-pool."""
        ref = scores(fast, X[:n_sub])
        others = [("general", lambda: scores(general, X[:n_sub]))] + ([("vmap", lambda: runs["vmap"]().double())] if "vmap" in runs else [])
        for name, run in others:
            other = run()
            diff = float((other - ref).abs().max() / ref.abs().max())
            if not diff <= 1e-4:
                raise AssertionError(f"{name} scores differ from dynal's by {diff:.1e} (relative)")

    return {"runs": runs, "scale": scale, "model": model, "check": check}


def timings(case: int, threads: int, rounds: int) -> dict:
    setup = _setup(case, threads)
    setup["check"]()
    best = best_times(setup["runs"], setup["scale"], rounds)
    return {**best, "params": sum(p.numel() for p in setup["model"].parameters())}


def peak_memory(case: int, path: str, threads: int) -> int | None:
    setup = _setup(case, threads)
    if path not in setup["runs"]:
        return None
    with Measure() as m:
        setup["runs"][path]()
    return m.peak_bytes


def main() -> None:
    args, pool = bench_cli(__doc__, rounds=3)
    lines = [
        f"torch {torch.__version__}, {args.threads} threads, {platform.machine()}; labeled set M = {N_LABELED}, "
        f"chunks of {CHUNK}; (d) runs on the sub-pool in chunks of 16 and is scaled to the pool; memory is the growth "
        "of resident memory in a fresh process (the first call included).",
        "",
        "| model | params | pool | sub-pool (d) | (a) inference /s (batch) | (c) all /s | (g) general /s | (d) vmap /s "
        "| (c)/(a) time | (g)/(c) time | (d)/(c) time | peak MB (a) / (c) / (g) / (d) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, (label, _, _, n, n_sub, _, _) in enumerate(CASES):
        t, mems = measure_case(pool, timings, peak_memory, case, PATHS, args)
        rate = lambda p: f"{n / t[p]:,.0f}" if p in t else "-"  # noqa: E731
        vmap_ratio = f"{t['vmap'] / t['all']:.1f}x" if "vmap" in t else "-"
        lines.append(
            f"| {label} | {t['params'] / 1e6:.2f}M | {n} | {n_sub} | {rate('inference')} ({t['inference_path'].split('/')[1]}) | "
            f"{rate('all')} | {rate('general')} | {rate('vmap')} | {t['all'] / t['inference']:.2f}x | "
            f"{t['general'] / t['all']:.1f}x | {vmap_ratio} | {' / '.join('-' if m is None else f'{m / 2**20:.0f}' for m in mems)} |"
        )
        print(lines[-1], flush=True)
    finish(args, "layer_coverage", "params='all' on sequence, text, tabular, depthwise-separable and 3-D models, and layers outside the fast path", lines)


if __name__ == "__main__":
    main()
