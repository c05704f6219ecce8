"""Build the Llama 2 tokenizer fixture (tokenizer.model + tokenizer.json) from llama.cpp's GGUF vocabulary.

    python scripts/make_tokenizer_fixture.py ../shared/fixtures/llama2-tokenizer tests/fixtures/llama2-tokenizer

The GGUF file holds Meta's 32000 pieces with scores and types. From them we write
- tokenizer.model: a SentencePiece ModelProto with the settings of Llama 2's own model file;
- tokenizer.json: the `tokenizers` layout of the official Llama 2 tokenizer.json (Prepend+Replace
  normalizer, no pre-tokenizer, BPE with byte fallback, merges derived from the piece scores);
and copy the 47 reference vectors, which tests/test_tokenizer.py checks both files against.
"""

import argparse
import json
import shutil
from pathlib import Path

import gguf
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 6 byte.
SPM_TYPE = {1: spm_pb2.ModelProto.SentencePiece.NORMAL, 2: spm_pb2.ModelProto.SentencePiece.UNKNOWN,
            3: spm_pb2.ModelProto.SentencePiece.CONTROL, 6: spm_pb2.ModelProto.SentencePiece.BYTE}


def read_vocab(gguf_path):
    reader = gguf.GGUFReader(gguf_path)
    fields = reader.fields
    pieces = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    return list(zip(pieces, scores, types))


def sentencepiece_model(vocab):
    m = spm_pb2.ModelProto()
    for piece, score, ttype in vocab:
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, score, SPM_TYPE[ttype]
    t = m.trainer_spec
    t.model_type = spm_pb2.TrainerSpec.BPE
    t.vocab_size = len(vocab)
    t.byte_fallback = True
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return m


def bpe_merges(vocab):
    """Merges in priority order: a pair (a, b) whose concatenation is a normal piece, ranked by that piece's score."""
    ids = {piece: i for i, (piece, _, _) in enumerate(vocab)}
    merges = []
    for piece, score, ttype in vocab:
        if ttype != 1:
            continue
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in ids and piece[k:] in ids]
        merges.extend(sorted(local, key=lambda m: (ids[m[0]], ids[m[1]])))
    merges.sort(key=lambda m: (-m[2], ids[m[0] + m[1]]))
    return [[a, b] for a, b, _ in merges]


def tokenizers_json(vocab):
    special = [{"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}
               for i, (piece, _, ttype) in enumerate(vocab) if ttype in (2, 3)]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {piece: i for i, (piece, _, _) in enumerate(vocab)},
                  "merges": bpe_merges(vocab)},
    }


TOKENIZER_CONFIG = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "pad_token": None, "model_max_length": 4096,
                    "tokenizer_class": "LlamaTokenizer", "legacy": True, "clean_up_tokenization_spaces": False}


def main(src, dst):
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    vocab = read_vocab(src / "ggml-vocab-llama-spm.gguf")
    (dst / "tokenizer.model").write_bytes(sentencepiece_model(vocab).SerializeToString())
    (dst / "tokenizer.json").write_text(json.dumps(tokenizers_json(vocab), ensure_ascii=False))
    (dst / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    for name in ("ggml-vocab-llama-spm.gguf.inp", "ggml-vocab-llama-spm.gguf.out", "LICENSE-llama.cpp"):
        shutil.copyfile(src / name, dst / name.replace("ggml-vocab-llama-spm.gguf.", "vectors."))
    print(f"wrote {dst}: {len(vocab)} pieces")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a folder with llama.cpp's ggml-vocab-llama-spm.gguf and its vectors")
    ap.add_argument("dst")
    main(**vars(ap.parse_args()))
