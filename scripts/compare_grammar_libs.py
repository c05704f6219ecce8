"""Which grammar library constrains json_schema answers: llguidance, xgrammar and outlines-core compared on
the same vocabularies (the demo model's and Llama 2's), the same schemas (tests/json_schemas.py) and the
same model, drawing at temperature 1 under each library's mask. Per library and schema: compile seconds,
whether it compiled (time to the first mask), answers that parse and validate, mask seconds per step (median). Needs the three
libraries and jsonschema beside the project's requirements:

    .venv/bin/pip install llguidance==1.9.1 xgrammar==0.2.8 outlines-core==0.2.14 jsonschema
    python scripts/compare_grammar_libs.py [--seeds 3] [--out FILE]
"""

import repo_root  # noqa: F401  (the repository's root on sys.path: tests.model_builders)
import argparse
import json
import statistics
import time
from pathlib import Path

import jsonschema
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from llama_pkg import prompt
from llama_pkg.params import validate
from llama_pkg.tokenizer import Tokenizer
from tests.json_schemas import HARDER, SCHEMAS

DEMO = Path("weights/smollm2-135m-instruct")
LLAMA2 = Path("tests/fixtures/llama2-tokenizer")
SEPARATORS = (", ", ": ")  # compact JSON, no free whitespace: the same language for all three


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, folder):
        import llguidance

        self.lib = llguidance
        self.tokenizer = llguidance.LLTokenizer((folder / "tokenizer.json").read_text(), eos_token=tok.eos_id)

    def compile(self, schema):
        m = self.lib.LLMatcher
        grammar = m.grammar_from_json_schema(json.dumps(schema), overrides={
            "whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]})
        error = m.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error)
        return grammar

    def matcher(self, grammar):
        return _LLGMatcher(self.lib.LLMatcher(self.tokenizer, grammar))


class _LLGMatcher:
    def __init__(self, m):
        self.m = m

    def fill(self, mask):
        self.m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

    def consume(self, token):
        return self.m.consume_token(token)

    def done(self):
        return self.m.is_stopped()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, folder):
        import xgrammar

        self.lib = xgrammar
        info = xgrammar.TokenizerInfo(list(tok.token_bytes), xgrammar.VocabType.RAW, vocab_size=tok.vocab_size,
                                      stop_token_ids=[tok.eos_id], add_prefix_space=bool(tok.space_prefixed))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)

    def matcher(self, compiled):
        return _XGMatcher(self.lib.GrammarMatcher(compiled))


class _XGMatcher:
    def __init__(self, m):
        self.m = m

    def fill(self, mask):
        t = torch.from_numpy(mask[None])
        self.m.fill_next_token_bitmask(t)

    def consume(self, token):
        return self.m.accept_token(token)

    def done(self):
        return self.m.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, folder):
        import outlines_core

        self.lib = outlines_core
        by_bytes = {}
        for i, b in enumerate(tok.token_bytes):
            if b and i != tok.eos_id:
                by_bytes.setdefault(b, []).append(i)
        self.eos = tok.eos_id
        self.vocab = outlines_core.Vocabulary(tok.eos_id, by_bytes)

    def compile(self, schema):
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=" ?")
        return self.lib.Index(regex, self.vocab)

    def matcher(self, index):
        return _OCMatcher(self.lib.Guide(index), self.eos)


class _OCMatcher:
    def __init__(self, guide, eos):
        self.g, self.eos = guide, eos

    def fill(self, mask):
        self.g.write_mask_into(mask.ctypes.data, mask.size, 4)

    def consume(self, token):
        if token == self.eos:
            return self.g.is_finished()
        self.g.advance(token)
        return True

    def done(self):
        return self.g.is_finished() and self.g.get_tokens() == [self.eos]


def allowed(mask, vocab):
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab]
    return torch.from_numpy(bits.astype(bool))


def run(model, tok, ids, matcher, seed, max_tokens):
    """Sample at temperature 1 under the mask -> (text, finished, per-step mask seconds, error)."""
    vocab = model.config.vocab_size
    mask = np.zeros((vocab + 31) // 32, dtype=np.int32)
    g = torch.Generator().manual_seed(seed)
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    text_ids, times = [], []
    for _ in range(max_tokens):
        if matcher.done():
            return tok.decode(text_ids), True, times, None
        started = time.perf_counter()
        mask[:] = 0
        matcher.fill(mask)
        times.append(time.perf_counter() - started)
        logits = out.logits[0, -1].float().masked_fill(~allowed(mask, vocab), -float("inf"))
        if not torch.isfinite(logits).any():
            return tok.decode(text_ids), False, times, "empty mask"
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        if token == tok.eos_id:
            return tok.decode(text_ids), True, times, None
        if not matcher.consume(token):
            return tok.decode(text_ids), False, times, f"token {token} refused after the mask allowed it"
        text_ids.append(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tok.decode(text_ids), False, times, None


def vocab_setup(libs, folder):
    """Each library's per-vocabulary set-up time (done once per tokenizer)."""
    tok = Tokenizer(folder)
    out = {}
    for cls in libs:
        started = time.perf_counter()
        lib = cls(tok, folder)
        out[cls.name] = (lib, time.perf_counter() - started)
    return tok, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--out", default="benchmarks/grammar-libs.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    libs = (LLGuidance, XGrammar, OutlinesCore)
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu": _cpu(),
              "versions": _versions(), "vocab_setup_seconds": {}, "compile": {}, "answers": {}}
    # compile time and support on both vocabularies
    for folder in (LLAMA2, DEMO):
        tok, built = vocab_setup(libs, folder)
        report["vocab_setup_seconds"][folder.name] = {n: round(s, 3) for n, (_, s) in built.items()}
        for name, (lib, _) in built.items():
            for title, schema, _ in SCHEMAS + HARDER:
                started = time.perf_counter()
                try:  # compiled, and the first mask (llguidance builds its lexer lazily, on first use)
                    lib.matcher(lib.compile(schema)).fill(np.zeros((tok.vocab_size + 31) // 32, dtype=np.int32))
                    error = None
                except Exception as e:  # noqa: BLE001 - recorded: the library does not support it
                    error = f"{type(e).__name__}: {str(e)[:160]}"
                report["compile"].setdefault(folder.name, {}).setdefault(name, {})[title] = {
                    "seconds": round(time.perf_counter() - started, 4), "error": error}
    # answers on the demo model
    tok, built = vocab_setup(libs, DEMO)
    model = AutoModelForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32).eval()
    template = prompt.model_template(tok.chat_template)
    with torch.inference_mode():
        for name, (lib, _) in built.items():
            tally = {"valid": 0, "invalid": 0, "unfinished": 0, "errors": [], "mask_seconds": []}
            for title, schema, ask in SCHEMAS + HARDER:
                try:
                    compiled = lib.compile(schema)
                except Exception:  # noqa: BLE001 - counted in "compile"
                    tally["errors"].append(f"{title}: does not compile")
                    continue
                ids = tok.encode(prompt.render(validate({"prompt": ask, "system_prompt": ""}), template,
                                               tok.special_tokens()))
                for seed in range(a.seeds):
                    text, finished, times, error = run(model, tok, ids, lib.matcher(compiled), seed, a.max_tokens)
                    tally["mask_seconds"] += times
                    if error:
                        tally["errors"].append(f"{title} seed {seed}: {error}")
                    if not finished:
                        tally["unfinished"] += 1
                        tally["errors"].append(f"{title} seed {seed}: unfinished at {a.max_tokens} tokens")
                        continue
                    try:
                        jsonschema.validate(json.loads(text), schema)
                        tally["valid"] += 1
                    except (ValueError, jsonschema.ValidationError) as e:
                        tally["invalid"] += 1
                        tally["errors"].append(f"{title} seed {seed}: {text!r}: {str(e)[:100]}")
            times = sorted(tally.pop("mask_seconds"))
            tally["mask_ms_median"] = round(statistics.median(times) * 1e3, 4)
            tally["mask_ms_p90"] = round(times[int(len(times) * 0.9)] * 1e3, 4)
            tally["steps"] = len(times)
            report["answers"][name] = tally
            print(name, json.dumps(tally, indent=1))
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("vocab_setup_seconds",)}, indent=1))
    for vocab, by_lib in report["compile"].items():
        for name, per in by_lib.items():
            ok = [v["seconds"] for v in per.values() if not v["error"]]
            print(f"{vocab:28s} {name:14s} compiled {len(ok)}/{len(per)}  median {statistics.median(ok):.4f} s  "
                  f"max {max(ok):.4f} s", [t for t, v in per.items() if v["error"]])


def _versions():
    from importlib.metadata import version

    return {p: version(p) for p in ("llguidance", "xgrammar", "outlines-core", "jsonschema")}


def _cpu():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
