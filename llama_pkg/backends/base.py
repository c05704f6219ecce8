"""The backend protocol: ids in, sampled ids out. A backend knows nothing of prompts, text or Cog."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Iterator, Protocol

from ..params import SamplingParams

if TYPE_CHECKING:
    import torch


class Backend(Protocol):
    name: str
    context_length: int
    concurrency: int  # generations it runs at once; more calls than that wait

    def generate(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                 stop_ids: frozenset[int], cancel: threading.Event | None = None) -> Iterator[int]:
        """Yield sampled ids one at a time, at most max_new_tokens; the last one may be a stop id.

        Same ids, settings and seed give the same tokens. Closing the iterator, or setting `cancel`
        (from any thread), ends the generation and frees what it held.
        """
        ...

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Every position's logits of one sequence, [len(ids), vocab] float32 on the CPU: the reference
        method the tests compare backends with."""
        ...
