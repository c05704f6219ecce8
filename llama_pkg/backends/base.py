"""The backend protocol: ids in, sampled ids out. A backend knows nothing of prompts, text or Cog."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Iterator, Protocol

from ..params import SamplingParams

if TYPE_CHECKING:
    import torch

    from ..grammar import Matcher


class Backend(Protocol):
    name: str
    context_length: int
    concurrency: int  # generations it runs at once; more calls than that wait
    structured: bool  # takes a constraint (json_schema); a backend without one is never given one

    def generate(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                 stop_ids: frozenset[int], cancel: threading.Event | None = None,
                 constraint: Matcher | None = None) -> Iterator[int]:
        """Yield sampled ids one at a time, at most max_new_tokens; the last one may be a stop id.

        Same ids, settings and seed give the same tokens. Closing the iterator, or setting `cancel`
        (from any thread), ends the generation and frees what it held. With a constraint, each draw
        is masked by it, each drawn id is consumed by it, and its document's end ends the generation.
        """
        ...

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Every position's logits of one sequence, [len(ids), vocab] float32 on the CPU: the reference
        method the tests compare backends with."""
        ...
