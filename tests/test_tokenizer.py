"""The committed fixture is the real Llama 2 tokenizer: all 47 llama.cpp reference vectors, both libraries."""

import json

import subprocess
import sys

import pytest
import sentencepiece as spm

from conftest import ROOT, TOKENIZER_DIR

VECTORS = list(zip(
    (TOKENIZER_DIR / "vectors.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n"),
    (TOKENIZER_DIR / "vectors.out").read_text().split("\n"),
))


def test_there_are_47_vectors():
    assert len(VECTORS) == 47


@pytest.mark.parametrize("text,expected", VECTORS, ids=[f"v{i}" for i in range(len(VECTORS))])
def test_reference_vectors(tokenizer, text, expected):
    ids = [int(x) for x in expected.split()]
    assert spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model")).encode(text) == ids
    assert tokenizer.encode_text(text) == ids


def test_inst_tags_and_special_ids(tokenizer):
    assert tokenizer.encode_text("[INST]") == [518, 25580, 29962]
    assert tokenizer.encode_text("[/INST]") == [518, 29914, 25580, 29962]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 32000)


def test_special_token_text_is_plain_text(tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    text = "a <s> b </s> c <unk>"
    ids = tokenizer.encode_text(text)
    assert ids == sp.encode(text)
    assert not {0, 1, 2} & set(ids)


@pytest.mark.slow  # rebuilds the fixture
def test_fixture_is_what_the_script_builds(tmp_path):
    source = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer"
    if not (source / "ggml-vocab-llama-spm.gguf").exists():
        pytest.skip("../shared is not beside this checkout; the committed fixture is checked by the vectors above")
    subprocess.run([sys.executable, "scripts/make_tokenizer_fixture.py", str(source), str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    for name in ("tokenizer.model", "tokenizer_config.json", "vectors.inp", "vectors.out"):
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
