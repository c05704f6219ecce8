"""Incremental detokenizing: streamed text equals the one-shot decode, never a half character."""

import random

import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TOKENIZER_DIR


def stream(tokenizer, ids):
    decoder = tokenizer.incremental_decoder()
    chunks = [decoder.push(i) for i in ids] + [decoder.flush()]
    return chunks


SP = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))


def test_emoji_cjk_and_byte_fallback(tokenizer):
    for text in ["🦙 llamas 🦙🦙", "中文 日本語 한국어", "Äpfel ½", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "a\u200db", "tab\tnew\nline"]:
        ids = tokenizer.encode_text(text)
        chunks = stream(tokenizer, ids)
        assert "".join(chunks) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in c for c in chunks)


def test_split_emoji_is_held_until_complete(tokenizer):
    ids = tokenizer.encode_text("🦙")  # ▁ then four byte tokens
    assert len(ids) == 5
    chunks = stream(tokenizer, ids)
    assert chunks[:4] == ["", "", "", ""] and chunks[4] == "🦙"


def test_leading_space_of_the_answer_is_dropped_once(tokenizer):
    ids = tokenizer.encode_text("Hello world")
    assert "".join(stream(tokenizer, ids)) == "Hello world"
    ids = tokenizer.encode_text(" two  spaces")
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == " two  spaces"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_streamed_text_equals_one_shot_decode(tokenizer, text):
    ids = tokenizer.encode_text(text)
    chunks = stream(tokenizer, ids)
    # SentencePiece spells a space "\u2581": a typed "\u2581" comes back as a space
    assert "".join(chunks) == tokenizer.decode(ids) == text.replace("\u2581", " ")
    assert sum(c.count("\ufffd") for c in chunks) == text.count("\ufffd")  # no half characters


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=3, max_value=31999), max_size=40))  # 0-2: unk, bos, eos
def test_random_ids_stream_equals_sentencepiece_decode(tokenizer, ids):
    # Random ids can hold broken UTF-8; SentencePiece (Meta's own tokenizer) then shows one U+FFFD
    # per bad byte and keeps the good ones, and so must the stream.
    assert "".join(stream(tokenizer, ids)) == SP.decode(ids)


def test_byte_heavy_random_ids_in_bulk(tokenizer):
    rng = random.Random(0)
    byte_tokens = list(range(3, 259))
    for _ in range(1000):
        ids = [rng.choice(byte_tokens) if rng.random() < 0.5 else rng.randrange(3, 32000) for _ in range(rng.randrange(1, 20))]
        assert "".join(stream(tokenizer, ids)) == SP.decode(ids)
