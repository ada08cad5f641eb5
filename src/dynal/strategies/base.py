"""The strategy contract.

A strategy names the pool outputs and labeled-set statistics it needs and is otherwise a pure
function of them, the budget and a ``numpy.random.Generator``. It returns dataset ids.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from dynal.engine.topk import StreamingTopK, draw_salt

Chunks = Iterable[dict[str, np.ndarray]]


class Strategy(ABC):
    """Base of every query strategy.

    Attributes
    ----------
    name : the registry name
    outputs : per-sample pool outputs the engine must compute (see ``dynal.engine.POOL_OUTPUTS``)
    labeled : labeled-set statistics the engine must compute (see ``dynal.engine.LABELED_STATS``)
    """

    name: ClassVar[str]
    outputs: tuple[str, ...] = ()
    labeled: tuple[str, ...] = ()

    def output_options(self) -> Mapping[str, Mapping[str, Any]]:
        """Options for the engine's outputs, keyed by output name."""
        return {}

    def config(self) -> dict[str, Any]:
        """The strategy's name and parameters, as logged with each query."""
        return {"name": self.name}

    @abstractmethod
    def select(self, chunks: Chunks, stats: Mapping[str, Any], budget: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Choose ``min(budget, pool size)`` distinct ids.

        Parameters
        ----------
        chunks : the pool pass, one dict per chunk with ``ids`` and the named outputs
        stats : the labeled-set statistics and facts about the model
        budget : how many ids to return (the caller caps it at the pool size)
        rng : the only source of randomness

        Returns
        -------
        ids, scores : chosen dataset ids in pick order and the score each had when picked
        """

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({params})"


class ScoreStrategy(Strategy):
    """A strategy whose query is the top-b of a per-sample score, reduced in O(b) memory.

    Ties are broken by a pseudo-random key per id drawn from the generator, so the pick does
    not depend on pool order for equal scores (copies of an input can score apart in their last
    bits where a multithreaded matrix product rounds a row by its place in the batch).
    """

    @abstractmethod
    def score(self, chunk: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> np.ndarray:
        """Score each sample of a chunk; higher means more worth labeling."""

    def select(self, chunks: Chunks, stats: Mapping[str, Any], budget: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        topk = StreamingTopK(budget, draw_salt(rng))
        for chunk in chunks:
            topk.push(chunk["ids"], self.score(chunk, stats))
        return topk.result()

