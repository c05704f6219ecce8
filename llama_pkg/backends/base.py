"""The backend interface: ids in, sampled ids out. A backend knows nothing of prompts, text or Cog."""

import threading
from dataclasses import dataclass
from typing import Iterator, Protocol

from ..params import Request


@dataclass(frozen=True)
class Sampling:
    """A generation's sampling settings; the defaults are the inputs' (params.Request, declared once)."""

    temperature: float = Request.temperature  # 0 means greedy
    top_p: float = Request.top_p
    top_k: int = Request.top_k  # 0 means off
    repetition_penalty: float = Request.repetition_penalty  # over every token in the context: prompt and output
    presence_penalty: float = Request.presence_penalty
    frequency_penalty: float = Request.frequency_penalty
    min_new_tokens: int = 0  # stop ids cannot be sampled before this many tokens (the input's -1 resolved)
    seed: int = 0


class Backend(Protocol):
    name: str
    context_length: int
    concurrency: int  # generations it runs at once; more calls than that wait

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                 stop_ids: frozenset[int], cancel: threading.Event | None = None) -> Iterator[int]:
        """Yield sampled ids one at a time, at most max_new_tokens; the last one may be a stop id.

        Same ids, settings and seed give the same tokens. Closing the iterator, or setting `cancel`
        (from any thread), ends the generation and frees what it held.
        """
        ...
