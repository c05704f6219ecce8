"""The engine end to end on the tiny test model: determinism, stops, EOS, context, metering."""

import logging

import threading

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TOKENIZER_DIR, recount, run
from llama_pkg import runtime
from llama_pkg.pipeline import Pipeline
from llama_pkg.params import InputError, validate

SP = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))


class Recording:
    """Wraps a backend and keeps every id it yielded; can fail after n tokens."""

    def __init__(self, backend, fail_after=None):
        self.inner, self.fail_after, self.ids, self.closed = backend, fail_after, [], False
        self.name, self.context_length, self.structured = backend.name, backend.context_length, backend.structured

    def generate(self, *args):
        try:
            for token in self.inner.generate(*args):
                if self.fail_after is not None and len(self.ids) == self.fail_after:
                    raise RuntimeError("backend failed mid-generation")
                self.ids.append(token)
                yield token
        finally:
            self.closed = True


def engine_with(engine, backend=None, stop_ids=None):
    e = Pipeline(backend or engine.backend, engine.tokenizer, engine.info)
    if stop_ids is not None:
        e.stop_ids = frozenset(stop_ids)
    return e


def test_same_seed_same_answer_and_metrics_are_exact(engine):
    rec = Recording(engine.backend)
    chunks, metrics = run(engine_with(engine, rec), prompt="Tell me about llamas", max_new_tokens=24, seed=5)
    again, _ = run(engine, prompt="Tell me about llamas", max_new_tokens=24, seed=5)
    other, _ = run(engine, prompt="Tell me about llamas", max_new_tokens=24, seed=6)
    assert chunks == again and chunks != other
    assert metrics["input_token_count"] == recount("Tell me about llamas", validate({"prompt": "x"}).system_prompt)
    assert metrics["output_token_count"] == len(rec.ids) == 24
    assert "".join(chunks) == SP.decode(rec.ids)
    assert metrics["time_to_first_token"] > 0 and metrics["tokens_per_second"] > 0
    assert metrics["finish_reason"] == "length"  # max_tokens ended it


def test_stop_sequence_ends_generation_and_is_not_emitted(engine):
    rec = Recording(engine.backend)
    full = "".join(run(engine, prompt="Go on", max_new_tokens=40, seed=11, temperature=0)[0])
    stop = full[len(full) // 2: len(full) // 2 + 4]
    chunks, metrics = run(engine_with(engine, rec), prompt="Go on", max_new_tokens=40, seed=11, temperature=0,
                          stop_sequences=f'["{stop}"]')
    text = "".join(chunks)
    assert text == full[:full.find(stop)] and stop not in text
    assert metrics["output_token_count"] == len(rec.ids) < 40
    assert stop in SP.decode(rec.ids) and stop not in SP.decode(rec.ids[:-1])  # stopped on the completing token
    assert rec.closed and metrics["finish_reason"] == "stop"


def test_eos_ends_generation_and_is_not_billed(engine):
    greedy = Recording(engine.backend)
    run(engine_with(engine, greedy), prompt="Count", max_new_tokens=12, temperature=0)
    k = 5
    eos = greedy.ids[k]
    assert eos not in greedy.ids[:k]
    rec = Recording(engine.backend)
    chunks, metrics = run(engine_with(engine, rec, stop_ids={eos}), prompt="Count", max_new_tokens=12, temperature=0)
    assert rec.ids == greedy.ids[:k + 1]  # the stop id was sampled ...
    assert metrics["output_token_count"] == k  # ... and not billed
    assert metrics["finish_reason"] == "stop"
    assert "".join(chunks) == SP.decode(greedy.ids[:k])


def test_min_new_tokens_holds_off_eos(engine):
    greedy = Recording(engine.backend)
    run(engine_with(engine, greedy), prompt="Count", max_new_tokens=3, temperature=0)
    eos = greedy.ids[0]
    rec = Recording(engine.backend)
    _, metrics = run(engine_with(engine, rec, stop_ids={eos}), prompt="Count", max_new_tokens=8, min_new_tokens=8,
                     temperature=0)
    assert len(rec.ids) == 8 and eos not in rec.ids and metrics["output_token_count"] == 8
    _, metrics = run(engine_with(engine, Recording(engine.backend), stop_ids={eos}), prompt="Count", max_new_tokens=8,
                     temperature=0)
    assert metrics["output_token_count"] == 0


def test_prompt_past_the_context_fails_with_both_numbers_and_is_not_billed(engine):
    prompt = "hello " * 5000
    metrics = {}
    with pytest.raises(InputError) as e:
        list(runtime.predict(engine, {"prompt": prompt, "max_new_tokens": 5}, metrics.__setitem__))
    n = len(engine.prompt_ids(validate({"prompt": prompt})))
    assert e.value.field == "prompt" and f"{n} tokens" in str(e.value) and "4096 tokens" in str(e.value)
    assert metrics == {"input_token_count": 0, "output_token_count": 0}


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(engine, monkeypatch):
    """12 MB of prompt: refused from its length alone (no token covers more than the vocabulary's longest
    piece), at once, unbilled, naming the field."""
    def no_tokenizing(*args):
        raise AssertionError("the prompt was tokenized")

    monkeypatch.setattr(engine.tokenizer, "encode", no_tokenizing)
    metrics = {}
    with pytest.raises(InputError) as e:
        list(runtime.predict(engine, {"prompt": "hello " * 2_000_000}, metrics.__setitem__))
    assert e.value.field == "prompt" and "at least" in str(e.value) and "4096 tokens" in str(e.value)
    assert metrics == {"input_token_count": 0, "output_token_count": 0}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["hello", " world", "\n\n", "    ", "日本語", "🙂", "the", "ing", " ", "▁", "x" * 40,
                                 " " * 33, "<s>", "[INST]", "\u0301", "é"]), max_size=80),
       st.text(max_size=60))
def test_the_length_bound_never_exceeds_the_real_count(tokenizer, pieces, noise):
    from llama_pkg.prompt import Bos, Markup, Text

    segments = [Bos(), Text("".join(pieces) + noise), Markup(noise)]
    assert tokenizer.min_tokens(segments) <= len(tokenizer.encode(segments))


def test_normalizers_that_may_shorten_text_are_applied_before_counting():
    from llama_pkg.tokenizer import _may_shrink

    llama = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                 {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    assert not _may_shrink(None) and not _may_shrink(llama)
    assert _may_shrink({"type": "NFC"}) and _may_shrink({"type": "Strip", "strip_left": True})
    assert _may_shrink({"type": "Sequence", "normalizers": [llama, {"type": "NFKC"}]})
    assert _may_shrink({"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "})


def test_max_new_tokens_is_reduced_to_fit(engine, caplog):
    prompt = "hello " * 4040
    n = len(engine.prompt_ids(validate({"prompt": prompt, "system_prompt": ""})))
    assert 4000 < n < 4096
    with caplog.at_level(logging.INFO, logger="llama_pkg"):
        logging.getLogger("llama_pkg").propagate = True
        try:
            _, metrics = run(engine, prompt=prompt, system_prompt="", max_new_tokens=512, min_new_tokens=512, seed=1)
        finally:
            logging.getLogger("llama_pkg").propagate = False
    assert metrics["input_token_count"] == n
    assert metrics["output_token_count"] == 4096 - n
    assert f"reduced from 512 to {4096 - n}" in caplog.text
    assert metrics["finish_reason"] == "length"  # the context's end


def test_cancelled_prediction_keeps_its_token_counts(engine):
    rec = Recording(engine.backend)
    metrics = {}
    stream = runtime.predict(engine_with(engine, rec), {"prompt": "Hi", "max_new_tokens": 50, "seed": 2}, metrics.__setitem__)
    for _ in range(4):
        next(stream)
    stream.close()  # what a client disconnect or cancel does to the generator
    assert rec.closed
    assert metrics["output_token_count"] == len(rec.ids) >= 4
    assert metrics["input_token_count"] > 0 and "finish_reason" not in metrics


def test_prediction_cancelled_before_it_starts_runs_and_bills_nothing(engine):
    rec = Recording(engine.backend)
    metrics, cancel = {}, threading.Event()
    cancel.set()
    chunks = list(runtime.predict(engine_with(engine, rec), {"prompt": "Hi", "max_new_tokens": 50}, metrics.__setitem__,
                                  cancel))
    assert chunks == [] and not rec.closed and metrics == {"input_token_count": 0, "output_token_count": 0}


def test_failed_prediction_keeps_its_token_counts(engine):
    rec = Recording(engine.backend, fail_after=3)
    metrics = {}
    with pytest.raises(RuntimeError, match="mid-generation"):
        list(runtime.predict(engine_with(engine, rec), {"prompt": "Hi", "max_new_tokens": 50, "seed": 2},
                             metrics.__setitem__))
    assert metrics["output_token_count"] == 3 and metrics["input_token_count"] > 0


def test_invalid_input_records_zero_counts(engine):
    metrics = {}
    with pytest.raises(InputError):
        list(runtime.predict(engine, {"prompt": "Hi", "top_k": -5}, metrics.__setitem__))
    assert metrics == {"input_token_count": 0, "output_token_count": 0}


def test_prompt_text_is_logged_only_when_asked_for(engine, monkeypatch, caplog):
    """Prompts are the users' data: logged only with LLAMA_PKG_LOG_PROMPTS=1 (the server routes the
    engine's log lines into the prediction's logs: tests/test_http.py)."""
    logger = logging.getLogger("llama_pkg")
    logger.addHandler(caplog.handler)  # runtime.setup stops llama_pkg's records at its own handler
    try:
        with caplog.at_level(logging.INFO, logger="llama_pkg"):
            run(engine, prompt="log me: kiwi-42", max_new_tokens=2)
            assert "kiwi-42" not in caplog.text and "Using seed" in caplog.text
            caplog.clear()
            monkeypatch.setenv("LLAMA_PKG_LOG_PROMPTS", "1")
            run(engine, prompt="log me: kiwi-42", max_new_tokens=2)
            assert "kiwi-42" in caplog.text
    finally:
        logger.removeHandler(caplog.handler)


def test_messages_give_the_same_answer_as_the_same_dialog_in_prompt(engine):
    """A dialog as messages and as [INST] turns in prompt: the same ids in, so the same answer and counts."""
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}]
    as_messages = run(engine, messages=dialog, max_tokens=12, seed=3)
    as_prompt = run(engine, prompt="[INST] Hi! [/INST] Hello. [INST] And now? [/INST]", system_prompt="Be brief.",
                    max_tokens=12, seed=3)
    billed = lambda m: (m["input_token_count"], m["output_token_count"], m["finish_reason"])  # noqa: E731
    assert as_messages[0] == as_prompt[0] and billed(as_messages[1]) == billed(as_prompt[1]) == (
        len([1] + SP.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. ") + [2, 1]
            + SP.encode("[INST] And now? [/INST]")), 12, "length")  # Meta's rule, counted with SentencePiece
