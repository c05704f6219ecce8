"""The Python API: `llama_pkg.load(weights)` gives a Model whose `generate` answers at once and whose
`stream` yields the text as it is generated, each with the prediction's metrics (the billed counts).
The same inputs, checks and metering as the CLI and Cog's server: runtime.predict underneath."""

import atexit
from dataclasses import dataclass

from . import runtime


@dataclass
class Answer:
    text: str
    metrics: dict  # input_token_count, output_token_count, finish_reason, ... (README: Metering)


class Stream:
    """The answer's text chunks as they are generated; `metrics` fills as they come (final at the end).
    Closing it early (or leaving a `for` loop) cancels the generation, billed what was generated."""

    def __init__(self, engine, inputs):
        self.metrics = {}
        self._chunks = runtime.predict(engine, inputs, self.metrics.__setitem__)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._chunks)

    def close(self):
        self._chunks.close()


class Model:
    def __init__(self, engine):
        self.engine = engine

    @classmethod
    def load(cls, weights=None):
        model = cls(runtime.setup(weights))
        atexit.register(model.close)  # the engine's thread stopped between two steps: exiting inside torch aborts
        return model

    def stream(self, **inputs):
        """Inputs by name, as `-i name=value` and Cog's JSON take them; llama_pkg.InputError names a bad one
        when the stream is first read."""
        return Stream(self.engine, inputs)

    def generate(self, **inputs):
        stream = self.stream(**inputs)
        return Answer("".join(stream), stream.metrics)

    def close(self):
        """Stop the backend (the batched engine's thread, ExLlamaV2's generator); idempotent, and run at exit."""
        if hasattr(self.engine.backend, "close"):
            self.engine.backend.close()
