"""Metering: what users are billed for (input and output token counts) and the speed figures that go with
them, recorded as they change so a cancelled prediction keeps its counts. The definitions are the
README's "Metering" table.
"""

import time


class Meter:
    def __init__(self, clock=time.perf_counter, record=None, observer=None):
        """record(name, value), when given, is called as soon as a billed count changes: a prediction
        that Cog cancels is finalized at once, with the counts recorded up to then. observer: the
        process's Prometheus metrics for this prediction (metrics.Observer), when they are served."""
        self._clock = clock
        self._record = record or (lambda name, value: None)
        self._observer = observer
        self.started = clock()
        self.input_token_count = 0
        self.output_token_count = 0
        self.first_token_at = None
        self.last_token_at = None
        self.truncated = None  # with json_schema: whether the answer was cut before its document's end
        self.finish_reason = None  # "stop" (EOS or a stop sequence) or "length" (max_tokens, the context's end)

    def prompt(self, n_ids):
        if self._observer:
            self._observer.prompt(n_ids)
        self.input_token_count = n_ids
        self._record("input_token_count", n_ids)
        self._record("output_token_count", self.output_token_count)

    def token(self):
        """One sampled token that is billed (every one but a final EOS)."""
        now = self._clock()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        if self._observer:
            self._observer.token()
        self.output_token_count += 1
        self._record("output_token_count", self.output_token_count)

    def metrics(self):
        m = {"input_token_count": self.input_token_count, "output_token_count": self.output_token_count}
        if self.truncated is not None:
            m["truncated"] = self.truncated
        if self.finish_reason is not None:
            m["finish_reason"] = self.finish_reason
        if self.first_token_at is not None:
            m["time_to_first_token"] = round(self.first_token_at - self.started, 6)
            decode_time = self.last_token_at - self.first_token_at
            if self.output_token_count > 1 and decode_time > 0:
                m["tokens_per_second"] = round((self.output_token_count - 1) / decode_time, 3)
        return m
