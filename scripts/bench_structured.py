"""What json_schema costs per engine step: 1 and 8 concurrent streams with a schema against the same
streams without, rounds interleaved (the order alternates), and each schema's compile time.

    python scripts/bench_structured.py [--weights weights/smollm2-135m-instruct] [--tokens 64]
                                                     [--rounds 10] [--out FILE]

Every stream makes exactly --tokens tokens: free streams with min_tokens = max_tokens, constrained ones
under a schema whose documents cannot end that soon, so every run has the same rows in every step. Two
schemas: "people" (an array of at least 50 objects with strings, integers and enums: the masks of keys,
strings and numbers; most ids are masked off, which also makes the sampler's sort cheaper) and "string"
(one long string: nearly every id allowed, the worst case for the mask's own cost). Per round: the engine's milliseconds per step (its own clock, over the round's steps) and the
host time spent writing masks (llguidance, timed by wrapping the model runner's fill_masks here only).
Figures: medians and quartiles over rounds; the overhead as the median and IQR of per-round paired ratios.
"""

import repo_root  # noqa: F401  (the repository's root on sys.path: tests.model_builders)
import argparse
import json
import platform
import statistics
import threading
import time
from importlib.metadata import version

import torch

from bench_stats import paired, quartiles, report  # scripts/ is on sys.path when run
from llama_pkg import runtime
from llama_pkg.engine import model_runner
from llama_pkg.grammar import Grammars
from llama_pkg.pipeline import Pipeline
from tests.json_schemas import HARDER, SCHEMAS

QUESTIONS = ["List people as JSON.", "Give me records of people.", "Make a JSON list of people.",
             "People, as JSON objects.", "A long list of people, please.", "Write people as JSON.",
             "JSON: many people.", "Generate people records."]
LONG = {"type": "object", "required": ["people"], "additionalProperties": False, "properties": {"people": {
    "type": "array", "minItems": 50, "items": {
        "type": "object", "required": ["name", "age", "role"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0,
                                                                           "maximum": 120},
                       "role": {"enum": ["admin", "user", "guest"]}}}}}}
STRING = {"type": "string", "minLength": 2000}
SCHEMAS_RUN = {"free": None, "people": LONG, "string": STRING}
MASK_SECONDS = []


def timed_fill_masks(*args):
    started = time.perf_counter()
    fill_masks(*args)
    MASK_SECONDS.append(time.perf_counter() - started)


fill_masks = model_runner.fill_masks
model_runner.fill_masks = timed_fill_masks


def streams_round(engine, n, tokens, schema, round_no):
    results = [None] * n

    def client(k):
        metrics = {}
        inputs = {"prompt": f"({round_no}.{k}) {QUESTIONS[k]}", "max_tokens": tokens, "seed": 1000 * round_no + k}
        inputs.update({"json_schema": json.dumps(schema)} if schema else {"min_tokens": tokens})
        for _ in runtime.predict(engine, inputs, metrics.__setitem__):
            pass
        results[k] = metrics

    before, masks_before = engine.backend.stats(), len(MASK_SECONDS)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = engine.backend.stats()
    assert all(r["output_token_count"] == tokens for r in results), results
    assert not schema or all(r["truncated"] for r in results)
    steps = after["steps"] - before["steps"]
    return {"ms_per_step": (after["step_seconds"] - before["step_seconds"]) / steps * 1e3,
            "mask_ms_per_step": sum(MASK_SECONDS[masks_before:]) / steps * 1e3}


def compile_times(engine):
    """Per schema: a cold compile and first mask (a new cache), then the cached path; milliseconds."""
    out = {}
    for title, schema, _ in SCHEMAS + HARDER + [("bench: people", LONG, ""), ("bench: string", STRING, "")]:
        text = json.dumps(schema)
        cold = Grammars(engine.info.folder, engine.info.config["vocab_size"], engine.stop_ids)
        started = time.perf_counter()
        cold.matcher(text)
        first = time.perf_counter() - started
        started = time.perf_counter()
        cold.matcher(text)
        out[title] = {"cold_ms": round(first * 1e3, 3), "cached_ms": round((time.perf_counter() - started) * 1e3, 3)}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="weights/smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out")
    a = ap.parse_args()
    runtime.configure_logging()
    engine = Pipeline.load(a.weights)
    assert engine.backend.name == "batched", engine.backend.name
    streams_round(engine, 1, 4, LONG, a.rounds)  # the vocabulary's tables, built on the first schema
    raw = {(n, s): [] for n in (1, 8) for s in SCHEMAS_RUN}
    for r in range(a.rounds):
        order = list(SCHEMAS_RUN.items())
        order = order[r % 3:] + order[:r % 3]  # each kind first, second and last in turn
        for n in (1, 8):
            for name, schema in order:
                raw[(n, name)].append(streams_round(engine, n, a.tokens, schema, r))
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "llguidance": version("llguidance"), "weights": a.weights,
           "tokens_per_stream": a.tokens, "rounds": a.rounds, "streams": {}}
    for n in (1, 8):
        free = [x["ms_per_step"] for x in raw[(n, "free")]]
        out["streams"][n] = {"free_ms_per_step": quartiles(free)}
        for name in ("people", "string"):
            steps = [x["ms_per_step"] for x in raw[(n, name)]]
            out["streams"][n][name] = {"ms_per_step": quartiles(steps), "over_free": paired(steps, free),
                                       "mask_ms_per_step": quartiles([x["mask_ms_per_step"] for x in raw[(n, name)]])}
        out["streams"][n]["raw"] = {k: raw[(n, k)] for k in SCHEMAS_RUN}
    out["compile"] = compile_times(engine)
    out["compile_cold_ms_median"] = statistics.median(v["cold_ms"] for v in out["compile"].values())
    report(out, a.out)


if __name__ == "__main__":
    main()
