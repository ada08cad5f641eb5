"""The streamed scoring engine: pool pass, per-sample outputs, labeled statistics, top-k."""

from dynal.engine.outputs import LABELED_STATS, POOL_OUTPUTS, Chunk, Context, residuals
from dynal.engine.pool import labeled_stats, pool_chunks
from dynal.engine.topk import StreamingTopK, draw_salt, tie_keys

__all__ = [
    "LABELED_STATS",
    "POOL_OUTPUTS",
    "Chunk",
    "Context",
    "StreamingTopK",
    "draw_salt",
    "labeled_stats",
    "pool_chunks",
    "residuals",
    "tie_keys",
]
