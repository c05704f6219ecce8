"""The backend interface: ids in, sampled ids out. A backend knows nothing of prompts, text or Cog."""

import threading
from dataclasses import dataclass
from typing import Iterator, Protocol


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.95
    top_k: int = 0  # 0 means off
    repetition_penalty: float = 1.15  # penalties count every token in the context: prompt and output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_new_tokens: int = 0  # stop ids cannot be sampled before this many tokens
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
