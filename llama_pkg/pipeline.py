"""The text pipeline: render -> tokenize -> backend.generate -> detokenize -> stop -> meter.

Every entry point (predict.py, the CLI, benchmarks) streams through `Pipeline.stream`.
"""

import logging
import secrets
import threading
import time

from . import backends, prompt, settings, weights
from .params import MAX_SEED, InputError, SamplingParams
from .stopping import StopMatcher
from .tokenizer import Tokenizer

log = logging.getLogger("llama_pkg")


class Pipeline:
    def __init__(self, backend, tokenizer, info):
        self.backend = backend
        self.tokenizer = tokenizer
        self.info = info
        self.stop_ids = frozenset({tokenizer.eos_id}) | info.eos_token_ids
        self.chat_template = prompt.model_template(tokenizer.chat_template)
        self.chat_format = "llama2" if self.chat_template is None else "chat_template"
        self._grammars, self._grammars_lock = None, threading.Lock()
        self.metrics = None  # Prometheus metrics (metrics.Metrics), when served (runtime.setup)
        self.setup_seconds = None

    @classmethod
    def load(cls, folder=None):
        """Find, verify and load a model folder, then warm it up; logs each step's time (the cold start)."""
        times = {}
        clock = time.perf_counter()

        def lap(step):
            nonlocal clock
            now = time.perf_counter()
            times[step] = now - clock
            clock = now

        folder = weights.resolve(folder)
        lap("find weights")
        info = weights.verify(folder)
        lap("verify")
        name, why = backends.choose(info)
        log.info("backend: %s (%s)", name, why)
        lap("choose backend")
        tokenizer = Tokenizer(folder)
        lap("load tokenizer")
        backend = backends.load(info, name)
        engine = cls(backend, tokenizer, info)
        lap("load model")
        try:
            engine.warm_up()
        except KeyboardInterrupt:
            if hasattr(backend, "close"):
                backend.close()  # its thread stops between two steps
            raise
        lap("warm-up")
        engine.setup_seconds = sum(times.values())
        log.info("setup %.2f s: %s; %s, chat format %s, context %d tokens", sum(times.values()),
                 ", ".join(f"{k} {v:.2f} s" for k, v in times.items()), folder, engine.chat_format,
                 info.context_length)
        return engine

    def warm_up(self):
        """One short generation, not metered, so the first real request does not pay for first-call costs.
        The prompt is long enough to take the prefill path a real prompt takes (on the GPU: dequantized
        weights through cuBLAS and multi-token attention, not the one-row kernels), then a few decode steps."""
        ids = self.tokenizer.encode([prompt.Bos(), prompt.Text("Hello, " * 32)])
        for _ in self.backend.generate(ids, 8, SamplingParams(min_new_tokens=8), self.stop_ids):
            pass

    def prompt_ids(self, request):
        """The ids fed to the model for this request: exactly what input_token_count counts. A prompt that
        cannot fit the context is refused before it is tokenized (a bound from its length)."""
        segments = prompt.render(request, self.chat_template, self.tokenizer.special_tokens())
        at_least = self.tokenizer.min_tokens(segments)
        if at_least >= self.info.context_length:
            chars = sum(len(s.text) for s in segments if hasattr(s, "text"))
            raise InputError("prompt", f"the prompt is at least {at_least} tokens ({chars} characters, and no token "
                                       f"covers more than {self.tokenizer.longest}), the model's context is "
                                       f"{self.info.context_length} tokens: no room left for an answer")
        return self.tokenizer.encode(segments)

    def budget(self, n_prompt, max_new_tokens):
        """max_tokens fitted into the context, or an error when the prompt leaves no room."""
        room = self.info.context_length - n_prompt
        if room < 1:
            raise InputError("prompt", f"the prompt is {n_prompt} tokens, the model's context is "
                                       f"{self.info.context_length} tokens: no room left for an answer")
        if max_new_tokens > room:
            log.info("max_tokens reduced from %d to %d to fit the %d-token context after a %d-token prompt",
                     max_new_tokens, room, self.info.context_length, n_prompt)
        return min(max_new_tokens, room)

    def constraint(self, request):
        """json_schema's matcher for this request (None for free text), or InputError before anything is
        billed: a backend that cannot constrain, a schema that does not compile."""
        if not request.json_schema:
            return None
        if not getattr(self.backend, "structured", False):
            raise InputError("json_schema", f"is not supported by the {self.backend.name} backend (it draws its tokens "
                                            "without the package's sampler); the package's engine supports it")
        with self._grammars_lock:
            if self._grammars is None:  # the vocabulary's tables: built once, on the first schema
                from .grammar import Grammars

                self._grammars = Grammars(self.info.folder, self.info.config["vocab_size"], self.stop_ids)
        return self._grammars.matcher(request.json_schema)

    def stream(self, request, meter, cancel=None):
        """Yield the answer's text chunks; `meter` counts input and output tokens as they happen.
        Setting the `cancel` event (threading.Event) ends the generation at the backend's next step."""
        ids = self.prompt_ids(request)
        if settings.get("LLAMA_PKG_LOG_PROMPTS") == "1":  # off by default: prompts are the users' data
            log.info("prompt (%d ids): %r", len(ids), self.tokenizer.decode(ids, skip_special_tokens=False))
        max_new = self.budget(len(ids), request.max_new)
        constraint = self.constraint(request)
        if cancel is not None and cancel.is_set():
            return  # cancelled before it started: nothing generated, nothing billed
        meter.prompt(len(ids))  # billed only once the prompt is accepted for generation
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        log.info("Using seed: %d", seed)
        matcher = StopMatcher(request.stops)
        decoder = self.tokenizer.incremental_decoder()
        tokens = self.backend.generate(ids, max_new, SamplingParams.of(request, max_new, seed), self.stop_ids, cancel,
                                       constraint)
        ended = cancelled = False  # ended: the token stream ended by itself (the engine let go of the constraint)
        drawn, reason = 0, None  # why the answer ended: "stop", "length"; None: cancelled (or failed)
        try:
            for token in tokens:
                if cancel is not None and cancel.is_set():
                    cancelled = True  # sampled before the backend saw the cancel, for a client that has gone:
                    break  # neither sent nor billed
                if token in self.stop_ids:
                    reason = "stop"
                    break
                meter.token()
                drawn += 1
                text = matcher.feed(decoder.push(token))
                if text:
                    yield text
                if matcher.stopped:
                    meter.finish_reason = "stop"
                    return
            if not cancelled:
                ended = True
                if reason is None:  # the document's end, or every token of the budget; fewer: a cancel
                    reason = ("stop" if constraint is not None and constraint.complete
                              else "length" if drawn == max_new else None)
                    cancelled = reason is None
            tail = matcher.feed(decoder.flush()) + matcher.flush()  # the held-back text of billed tokens
            meter.finish_reason = "stop" if matcher.stopped else reason
            if tail:
                yield tail
        finally:
            tokens.close()
            if constraint is not None:
                _report_document(constraint, ended, matcher.stopped, cancelled, meter)


def _report_document(constraint, ended, stopped, cancelled, meter):
    """Whether a json_schema answer is a whole document: the `truncated` metric, and a log line saying what
    cut it when it is not. The matcher is read only once the engine let go of it (`ended`)."""
    meter.truncated = stopped or not (ended and constraint.complete)
    if meter.truncated:
        why = ("a stop sequence" if stopped else constraint.error if ended and constraint.error
               else "a cancel" if cancelled else "a failure" if not ended else "max_tokens (or the end of the context)")
        log.warning("json_schema: the answer is not a complete JSON document: it was cut by %s", why)
