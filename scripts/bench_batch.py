"""Concurrent streams on the batched engine, and one stream against the transformers backend, in one run.

    python scripts/bench_batch.py [--weights weights/smollm2-135m-instruct] [--tokens 64] [--rounds 10] [--out FILE]

Every round, interleaved: one stream on the transformers backend (the old CPU path), then 1, 2, 4 and
8 concurrent streams through Engine.stream() on the batched engine (each stream its own prompt after
the default system prompt, default sampling, min_tokens = max_tokens so every stream makes
exactly --tokens tokens). Both backends compute on the engine's thread (two threads computing with
OpenMP slow each other: engine/llm_engine.py). Printed as JSON: per stream count, the aggregate tok/s
(all tokens over the wall time), each stream's tok/s and time to first token (median, quartiles and
p90 over all streams of all rounds), the ratios as the median and interquartile range of the paired
per-round ratios (never a ratio of two medians or maxima from different rounds), and the engine's own
time per step (scheduling, not forward or sampling).
"""

import argparse
import platform
import statistics
import threading
import time

import torch

from bench_stats import paired, percentile, quartiles, report  # scripts/ is on sys.path when run
from llama_pkg import runtime
from llama_pkg.backends.hf import TransformersBackend
from llama_pkg.params import SamplingParams, validate
from llama_pkg.pipeline import Pipeline

STREAMS = (1, 2, 4, 8)
QUESTIONS = ["Tell me about llamas.", "What is the capital of France?", "Write a haiku about rain.",
             "Explain photosynthesis briefly.", "Name three prime numbers.", "How do airplanes fly?",
             "What is a GPU?", "Give me a recipe for pancakes."]


def summary(values):
    return {**quartiles(values), "p90": round(percentile(values, 0.9), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def streams_round(engine, n, tokens, round_no):
    results = [None] * n

    def client(k):
        metrics = {}
        inputs = {"prompt": f"({round_no}.{k}) {QUESTIONS[k % len(QUESTIONS)]}", "max_tokens": tokens,
                  "min_tokens": tokens, "seed": 1000 * round_no + k}
        for _ in runtime.predict(engine, inputs, metrics.__setitem__):
            pass
        results[k] = metrics

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert all(r["output_token_count"] == tokens for r in results)
    return wall, results


def transformers_round(engine, hf, tokens, round_no):
    """One stream's decode tok/s on the transformers backend, with the same request shape."""
    request = validate({"prompt": f"({round_no}) {QUESTIONS[0]}", "max_tokens": tokens,
                        "min_tokens": tokens, "seed": round_no})
    ids = engine.prompt_ids(request)
    sampling = SamplingParams.of(request, tokens, round_no)

    def timed():
        first, n = None, 0
        for _ in hf.generate(ids, tokens, sampling, engine.stop_ids):
            n += 1
            if first is None:
                first = time.perf_counter()
        return (n - 1) / (time.perf_counter() - first)

    return engine.backend.call(timed)


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
    hf = engine.backend.call(lambda: TransformersBackend(a.weights, engine.info.context_length,
                                                                   gptq=engine.info.is_gptq))
    engine.backend.call(lambda: list(hf.generate([1, 2, 3], 4, SamplingParams(min_new_tokens=4), frozenset())))
    raw = {n: {"wall": [], "per_stream_tps": [], "ttft": [], "round_tps": []} for n in STREAMS}
    hf_tps = []
    before = engine.backend.stats()
    for r in range(a.rounds):
        hf_tps.append(transformers_round(engine, hf, a.tokens, r))
        for n in STREAMS:
            wall, results = streams_round(engine, n, a.tokens, r)
            raw[n]["wall"].append(wall)
            raw[n]["per_stream_tps"] += [m["tokens_per_second"] for m in results]
            raw[n]["round_tps"].append(statistics.median(m["tokens_per_second"] for m in results))
            raw[n]["ttft"] += [m["time_to_first_token"] for m in results]
    stats = engine.backend.stats()
    steps = stats["steps"] - before["steps"]
    step_s = stats["step_seconds"] - before["step_seconds"]
    forward_s = stats["forward_seconds"] - before["forward_seconds"]
    sample_s = stats["sample_seconds"] - before["sample_seconds"]
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "weights": a.weights, "tokens_per_stream": a.tokens, "rounds": a.rounds,
           "transformers_one_stream_tps": summary(hf_tps), "streams": {}}
    for n in STREAMS:
        aggregate = [n * a.tokens / w for w in raw[n]["wall"]]
        out["streams"][n] = {"aggregate_tps": summary(aggregate), "per_stream_tps": summary(raw[n]["per_stream_tps"]),
                             "ttft_s": summary(raw[n]["ttft"])}
    out["aggregate_4_over_1"] = paired([4 * a.tokens / w for w in raw[4]["wall"]], [a.tokens / w for w in raw[1]["wall"]])
    out["engine_one_stream_over_transformers"] = paired(raw[1]["round_tps"], hf_tps)
    out["engine_step"] = {"steps": steps, "ms_per_step": round(step_s / steps * 1e3, 3),
                          "forward_share": round(forward_s / step_s, 4), "sampling_share": round(sample_s / step_s, 4),
                          "scheduler_overhead_share": round((step_s - forward_s - sample_s) / step_s, 4)}
    report(out, a.out)


if __name__ == "__main__":
    main()
