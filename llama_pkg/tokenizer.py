"""The tokenizer: prompt segments -> ids, and ids -> text one token at a time. Reads tokenizer.json (the
Llama 2 layout or a byte-level BPE such as SmolLM2's) and tokenizer_config.json. Decoding works on
bytes, releasing text only once a character is complete: a streamed emoji never arrives in halves.
"""

import codecs
import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from . import cdiv
from .prompt import Bos, Eos, Markup, Text

SPIECE_SPACE = "\u2581"


def _gpt2_byte_decoder():
    """The inverse of GPT-2's bytes_to_unicode: byte-level BPE pieces are bytes spelled as printable chars."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_types(decoder):
    if not decoder:
        return set()
    return {decoder["type"]} | {t for d in decoder.get("decoders", []) for t in _decoder_types(d)}


def _per_byte_replace(error):
    # One U+FFFD per invalid byte, as the tokenizers ByteFallback decoder does.
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("llama_pkg.per_byte", _per_byte_replace)


class Tokenizer:
    def __init__(self, folder):
        folder = Path(folder)
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        self._markup = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        self._text = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        self._text.encode_special_tokens = True
        template_file = folder / "chat_template.jinja"
        self.chat_template = template_file.read_text(encoding="utf-8") if template_file.exists() else config.get("chat_template")
        self.bos_token = _token_content(config.get("bos_token")) or "<s>"
        self.eos_token = _token_content(config.get("eos_token")) or "</s>"
        self.bos_id = self._markup.token_to_id(self.bos_token)
        self.eos_id = self._markup.token_to_id(self.eos_token)
        if self.eos_id is None:
            raise ValueError(f"{folder}: eos_token {self.eos_token!r} is not in the vocabulary")
        self.vocab_size = self._markup.get_vocab_size(with_added_tokens=True)
        self.token_bytes, self.space_prefixed = _token_bytes(spec, self.vocab_size)
        # The most characters of text one id covers (a piece's bytes decoded; a partial character counts
        # as one): a text of n characters is at least n / longest ids, a bound that needs no tokenizing.
        self.longest = max(1, max(len(b.decode("utf-8", "replace")) for b in self.token_bytes))
        self._may_shrink = _may_shrink(spec.get("normalizer"))

    def encode(self, segments):
        """Prompt segments -> ids. Text is always plain text; only Markup and Bos/Eos yield special tokens."""
        ids = []
        for seg in segments:
            if isinstance(seg, Bos):
                if self.bos_id is not None:
                    ids.append(self.bos_id)
            elif isinstance(seg, Eos):
                ids.append(self.eos_id)
            elif isinstance(seg, Text):
                ids += self._text.encode(seg.text, add_special_tokens=False).ids
            elif isinstance(seg, Markup):
                ids += self._markup.encode(seg.text, add_special_tokens=False).ids
            else:
                raise TypeError(f"not a prompt segment: {seg!r}")
        return ids

    def min_tokens(self, segments):
        """A lower bound on len(encode(segments)), without tokenizing: cheap for a text of megabytes.
        Exact as a bound: the text is counted after the tokenizer's normalizer where that could
        shorten it (composition, stripping), as-is otherwise."""
        n = 0
        for seg in segments:
            if isinstance(seg, (Bos, Eos)):
                n += 1
            elif isinstance(seg, (Text, Markup)):
                text = self._text.normalizer.normalize_str(seg.text) if self._may_shrink else seg.text
                n += cdiv(len(text), self.longest)
        return n

    def encode_text(self, text):
        return self._text.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        """One-shot decode with the tokenizers package (the reference the streaming decoder must match)."""
        return self._markup.decode(ids, skip_special_tokens=skip_special_tokens)

    def special_tokens(self):
        return {"bos_token": self.bos_token, "eos_token": self.eos_token}

    def incremental_decoder(self):
        return IncrementalDecoder(self.token_bytes, self.space_prefixed)


def _may_shrink(normalizer):
    """Whether a tokenizer.json normalizer can make a text shorter (Llama's Prepend and Replace(" ", "▁")
    cannot; NFC composition, stripping and most replacements can)."""
    if normalizer is None:
        return False
    kind = normalizer.get("type")
    if kind == "Sequence":
        return any(_may_shrink(n) for n in normalizer.get("normalizers", []))
    if kind == "Replace":
        pattern = normalizer.get("pattern", {})
        return "String" not in pattern or len(normalizer.get("content", "")) < len(pattern["String"])
    return kind not in ("Prepend", "NFD", "NFKD", "Lowercase")


def _token_content(token):
    return token.get("content") if isinstance(token, dict) else token


def _token_bytes(spec, vocab_size):
    """Each id's bytes (special tokens: none), and the ids whose leading space decoding drops when the
    id starts the text: SentencePiece's dummy-prefix pieces ("▁word"); none for byte-level BPE."""
    vocab = spec["model"]["vocab"]
    pieces = [""] * vocab_size
    for piece, i in vocab.items():
        pieces[i] = piece
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for t in spec.get("added_tokens", []):
        pieces[t["id"]] = t["content"]
    types = _decoder_types(spec.get("decoder"))
    table = []
    if "ByteLevel" in types:
        byte_of = _gpt2_byte_decoder()
        for i, piece in enumerate(pieces):
            table.append(b"" if i in special else bytes(byte_of[c] for c in piece) if all(c in byte_of for c in piece)
                         else piece.encode())
        return table, frozenset()
    byte_piece = re.compile(r"<0x([0-9A-Fa-f]{2})>")
    for i, piece in enumerate(pieces):
        m = byte_piece.fullmatch(piece)
        if i in special:
            table.append(b"")
        elif m and "ByteFallback" in types:
            table.append(bytes([int(m.group(1), 16)]))
        else:
            table.append(piece.replace(SPIECE_SPACE, " ").encode())
    prefixed = frozenset(vocab[p] for p in vocab if p.startswith(SPIECE_SPACE)) if "Strip" in types else frozenset()
    return table, prefixed


class IncrementalDecoder:
    """Token ids in, text out, never a partial character; concatenated output equals the one-shot decode."""

    def __init__(self, token_bytes, space_prefixed):
        self._bytes = token_bytes
        self._space_prefixed = space_prefixed
        self._utf8 = codecs.getincrementaldecoder("utf-8")("llama_pkg.per_byte")
        self._started = False

    def push(self, token_id):
        data = self._bytes[token_id]
        if not self._started and data:
            self._started = True
            if token_id in self._space_prefixed:
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self):
        return self._utf8.decode(b"", final=True)
