"""json_schema: a JSON Schema -> a grammar over the model's vocabulary (llguidance, chosen on evidence:
benchmarks/RESULTS.md), one matcher per request that writes each step's token mask (32 ids a word) and
consumes the drawn token. Compact JSON (", " and ": ", no free whitespace, so no answer can loop on
blank lines); keywords the library does not implement are refused, never ignored."""

import threading
from collections import OrderedDict
from pathlib import Path

import llguidance
import numpy

from . import cdiv
from .params import InputError

CACHE_SCHEMAS = 64  # compiled grammars kept, keyed by the schema text
OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}


def words(vocab):
    """int32 words of one row's mask."""
    return cdiv(vocab, 32)


class Grammars:
    """The compiler for one model: its vocabulary (mask width = the model's vocab; ids beyond the
    tokenizer's are never allowed), its stop ids (allowed where the document may end), a bounded cache."""

    def __init__(self, folder, vocab, stop_ids):
        self.vocab = vocab
        text = (Path(folder) / "tokenizer.json").read_text(encoding="utf-8")
        try:
            self.tokenizer = llguidance.LLTokenizer(text, n_vocab=vocab, eos_token=sorted(stop_ids))
        except ValueError as e:  # e.g. a tokenizer with more ids than the model has logits
            raise InputError("json_schema", f"is not available for this model: {_short(str(e))}") from None
        self.cache, self.lock = OrderedDict(), threading.Lock()

    def compile(self, schema_text):
        """A validated schema's text -> its grammar, or InputError naming json_schema and the reason."""
        with self.lock:
            if schema_text in self.cache:
                self.cache.move_to_end(schema_text)
                return self.cache[schema_text]
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text, overrides=OPTIONS)
        except ValueError as e:
            raise InputError("json_schema", f"cannot be compiled: {_short(str(e))}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)  # its default limits
        if error:
            raise InputError("json_schema", f"cannot be compiled: {_short(error)}")
        with self.lock:
            self.cache[schema_text] = grammar
            while len(self.cache) > CACHE_SCHEMAS:
                self.cache.popitem(last=False)
        return grammar

    def matcher(self, schema_text):
        """A fresh matcher for one request (the first mask is computed here, so a schema too large for the
        lexer's limits fails before anything is billed)."""
        m = Matcher(llguidance.LLMatcher(self.tokenizer, self.compile(schema_text)), self.vocab)
        if m.error:
            raise InputError("json_schema", f"cannot be compiled: {_short(m.error)}")
        return m


class Matcher:
    """One request's place in its grammar. The engine's thread alone uses it once generation starts."""

    def __init__(self, matcher, vocab):
        self.m = matcher
        first = numpy.empty(words(vocab), dtype=numpy.int32)
        self.m.unsafe_compute_mask_ptr(first.ctypes.data, first.nbytes)  # meets the lexer's limits, or errs

    def consume(self, token):
        """The drawn id; False when the grammar refuses it (then `error` says why)."""
        return self.m.consume_token(token)

    @property
    def done(self):
        """Nothing but a stop id may follow: the document is complete (or the matcher failed: `error`)."""
        return self.m.is_stopped()

    @property
    def complete(self):
        """What was consumed is a whole document that validates."""
        return self.m.is_accepting() and not self.m.is_error()

    @property
    def error(self):
        return self.m.get_error()


_executor = None


def fill_masks(rows, address, row_bytes, total_rows):
    """Several requests' masks at once, on llguidance's threads: rows: (Matcher, row) pairs; the memory at
    `address` holds total_rows rows of row_bytes each."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    _executor.unsafe_compute_mask_ptr([(m.m, row) for m, row in rows], address, row_bytes, total_rows)


def _short(error):
    """A library's message on one line, at most 300 characters."""
    return " ".join(error.split())[:300] or "unknown error"
