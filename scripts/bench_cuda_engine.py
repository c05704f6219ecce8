"""GPU benchmark of the batched engine on CUDA (ExLlamaV2's GPTQ kernels, Triton paged attention, CUDA
graphs) against the bare ExLlamaV2 dynamic generator, on the Llama-2-7B-shaped GPTQ checkpoint's peaked
twin (bench_gpu.py writes both: random weights, a lm_head that gives a chat model's spread).

    python scripts/bench_cuda_engine.py --out results.json [--rounds 10] [--tokens 256] [--streams 1,4,16,32,64]

In one run: one stream through predict() vs the bare generator, interleaved rounds (median and IQR of
the paired ratios); 1..max concurrent streams (aggregate tok/s, per-stream tok/s, time to first token
p50/p95); TTFT of fresh 128- and 2048-token prompts; setup time with graph capture; the decode step's
GPU time per graph bucket (the curve the buckets and the maximum batch come from) against the host's
wall time per step; GPU memory. Every figure is a median (or a percentile) over rounds, never a best.
"""

import repo_root  # noqa: F401  (the repository's root on sys.path: tests.model_builders)
import argparse
import logging
import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from bench_gpu import bare_generator_tps, prompt_of  # scripts/ is on sys.path when run
from bench_stats import paired, percentile, report

from llama_pkg import cdiv
from tests.model_builders import SHAPE, peaked_twin, write_checkpoint

log = logging.getLogger("bench")


def predict_tps(engine, inputs):
    from llama_pkg import runtime

    metrics = {}
    for _ in runtime.predict(engine, inputs, metrics.__setitem__):
        pass
    assert metrics["output_token_count"] == inputs["max_tokens"], metrics
    return metrics["tokens_per_second"], metrics


def streams(backend, n, prompt_len, tokens, seed):
    """n concurrent requests of random prompt ids (no shared prefix beyond chance) -> per-stream timings."""
    from llama_pkg.params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    prompts = [[1] + torch.randint(3, 32000, (prompt_len - 1,), generator=g).tolist() for _ in range(n)]
    results = [None] * n
    start = threading.Barrier(n + 1)

    def one(i):
        start.wait()
        t0 = time.perf_counter()
        first = last = None
        count = 0
        for _ in backend.generate(prompts[i], tokens, SamplingParams(min_new_tokens=tokens, seed=i), frozenset({2})):
            last = time.perf_counter()
            first = first or last
            count += 1
        results[i] = (t0, first, last, count)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    ended = max(r[2] for r in results)
    total = sum(r[3] for r in results)
    assert all(r[3] == tokens for r in results), [r[3] for r in results]
    per_stream = [(r[3] - 1) / (r[2] - r[1]) for r in results]
    ttft = [(r[1] - r[0]) * 1e3 for r in results]
    return {"n": n, "aggregate_tok_s": round(total / (ended - began), 1),
            "per_stream_tok_s_median": round(statistics.median(per_stream), 1),
            "per_stream_tok_s_min": round(min(per_stream), 1),
            "ttft_ms_p50": round(percentile(ttft, 0.5), 1), "ttft_ms_p95": round(percentile(ttft, 0.95), 1),
            "wall_s": round(ended - began, 3)}


def arrivals(backend, running=16, arriving=16, prompt_len=512, tokens=256, seed=7):
    """Inter-token gaps of `running` decoding streams while `arriving` new prompts of prompt_len ids arrive
    at once (their prefill shares the steps): median and p99 of the gaps from the arrivals until the last
    newcomer's first token, against the median before they came."""
    from llama_pkg.params import SamplingParams

    g = torch.Generator().manual_seed(seed)

    def prompt(n):
        return [1] + torch.randint(3, 32000, (n - 1,), generator=g).tolist()

    stamps = [[] for _ in range(running)]
    firsts = []

    def run(i):
        for _ in backend.generate(prompt(64), tokens, SamplingParams(min_new_tokens=tokens, seed=i), frozenset()):
            stamps[i].append(time.perf_counter())

    def arrive(i):
        for _ in backend.generate(prompt(prompt_len), 1, SamplingParams(seed=100 + i), frozenset()):
            firsts.append(time.perf_counter())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(running)]
    for t in threads:
        t.start()
    while min(len(s) for s in stamps) < tokens // 4:  # steady decoding first
        time.sleep(0.005)
    came = time.perf_counter()
    newcomers = [threading.Thread(target=arrive, args=(i,)) for i in range(arriving)]
    for t in newcomers:
        t.start()
    for t in newcomers + threads:
        t.join()
    served = max(firsts)
    gaps = [(b - a, b) for s in stamps for a, b in zip(s, s[1:])]
    before = [gap for gap, at in gaps if at < came]
    during = [gap for gap, at in gaps if came <= at <= served]
    median = statistics.median(during)
    return {"running": running, "arriving": arriving, "arriving_prompt_tokens": prompt_len,
            "intertoken_ms_median_before": round(statistics.median(before) * 1e3, 2),
            "intertoken_ms_median_during": round(median * 1e3, 2),
            "intertoken_ms_p99_during": round(percentile(during, 0.99) * 1e3, 2),
            "intertoken_p99_over_median": round(percentile(during, 0.99) / median, 2),
            "arrivals_served_ms": round((served - came) * 1e3, 1)}


def ttft_fresh(backend, prompt_len, rounds, seed):
    """Time to the first token of a prompt nothing of which is cached, one request at a time."""
    from llama_pkg.params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rounds + 1):
        ids = [1] + torch.randint(3, 32000, (prompt_len - 1,), generator=g).tolist()
        t0 = time.perf_counter()
        tokens = backend.generate(ids, 1, SamplingParams(seed=0), frozenset())
        next(tokens)
        out.append((time.perf_counter() - t0) * 1e3)
        tokens.close()
    return out[1:]  # the first one after the previous phase is not counted


@contextmanager
def synthetic_rows(runner, b, context):
    """Bucket b's graph inputs as b sequences of `context` positions, each in blocks of its own. Run on the
    engine's thread before any request (it borrows free sampler rows and pool blocks); the tables and
    inputs are padding again afterwards."""
    width = cdiv(context, runner.bs)
    if b * width > runner.scratch_block:  # the scratch block is the first one past the pool
        raise ValueError(f"{b} rows of {context} positions need {b * width} KV blocks, the pool has {runner.scratch_block}")
    inputs = runner.graphs.inputs[b]
    runner.tables[:b, :width] = torch.arange(b * width, device=runner.device, dtype=torch.int32).view(b, width)
    inputs[0], inputs[1], inputs[3] = 0, context - 1, 0
    inputs[2] = torch.arange(b, device=runner.device)
    try:
        yield inputs
    finally:
        runner.tables.fill_(runner.scratch_block)
        inputs.copy_(runner.graphs.padding(b))


def replay_ms(graph, rounds=20):
    """Median GPU time of a graph's replay, in ms."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def step_curve(backend, context):
    """GPU time of one decode step (graph replay) per bucket, in ms, every row a sequence of `context`
    positions."""
    graphs = backend.runner.graphs

    def measure():
        out = {}
        for b in graphs.buckets:
            with synthetic_rows(backend.runner, b, context):
                ms = replay_ms(graphs.graphs[b])
            out[b] = {"step_ms_median": round(ms, 3), "tok_s_at_full_bucket": round(b / ms * 1e3, 1)}
        return out

    return backend.call(measure)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--folder", default="/tmp/llama-2-7b-shaped-gptq")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--streams", default="1,4,16,32,64")
    ap.add_argument("--peaked-logit-std", type=float, default=6.0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("LLAMA_PKG_ALLOW_COMPILE", "1")
    os.environ["LLAMA_PKG_BACKEND"] = "batched"  # on CUDA only when asked for, until its checks pass
    from llama_pkg import runtime
    from llama_pkg.backends.exllamav2 import ExLlamaV2Backend, sampler_settings
    from llama_pkg.params import SamplingParams, validate

    t = time.perf_counter()
    base = Path(a.folder) if (Path(a.folder) / "config.json").exists() else write_checkpoint(a.folder)
    folder = peaked_twin(base, a.peaked_logit_std)
    results = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
               "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
               "triton": __import__("triton").__version__, "exllamav2": __import__("exllamav2").__version__,
               "checkpoint": f"Llama-2-7B-shaped GPTQ 4-bit g{SHAPE['group']}, random weights, peaked twin "
                             f"(logit std {a.peaked_logit_std})", "checkpoint_write_s": round(time.perf_counter() - t, 1),
               "prompt_tokens": a.prompt, "new_tokens": a.tokens,
               "sampling": "defaults: temperature 0.7, top_p 0.95, top_k 0, repetition_penalty 1.15"}

    # the baseline first: the engine's automatic KV pool then takes what is left
    bare = ExLlamaV2Backend(folder, 4096, allow_compile=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine = runtime.setup(folder)
    torch.cuda.synchronize()
    results["setup_s"] = round(time.perf_counter() - t, 2)
    backend = engine.backend
    assert backend.name == "batched" and backend.model.device.type == "cuda", backend.name
    graphs, cache = backend.runner.graphs, backend.runner.cache
    kv_bytes = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    results.update({"capture_s": round(graphs.capture_seconds, 2), "graph_buckets": graphs.buckets,
                    "max_batch": backend.concurrency, "kv_cache_gb": round(kv_bytes / 1e9, 2),
                    "kv_cache_tokens": backend.pool.blocks * backend.pool.block_size,
                    "requests_of_128_plus_512": backend.pool.blocks // backend.pool.blocks_for(640)})
    log.info("setup %.1f s (graphs %.1f s), KV %.1f GB", results["setup_s"], results["capture_s"],
             results["kv_cache_gb"])

    # first, while no request has run: the decode step's GPU time against the batch size
    results["step_curve"] = step_curve(backend, a.prompt + a.tokens)
    results["one_stream_step_gpu_ms"] = results["step_curve"][1]["step_ms_median"]
    log.info("step curve (ms): %s", {b: v["step_ms_median"] for b, v in results["step_curve"].items()})

    # one stream: predict() through the engine vs the bare generator, interleaved, paired per round
    inputs = {**prompt_of(a.prompt), "max_tokens": a.tokens, "min_tokens": a.tokens, "seed": 1}
    ids = engine.prompt_ids(validate(inputs))
    settings = sampler_settings(SamplingParams.of(validate(inputs), a.tokens, 1))
    bare_generator_tps(bare.generator, ids, a.tokens, settings)
    predict_tps(engine, inputs)  # warm both
    eng, base_tps, steps_before = [], [], backend.stats()
    for _ in range(a.rounds):
        eng.append(predict_tps(engine, inputs)[0])
        base_tps.append(bare_generator_tps(bare.generator, ids, a.tokens, settings))
    s = backend.stats()
    host_ms = (s["step_seconds"] - steps_before["step_seconds"]) / max(1, s["steps"] - steps_before["steps"]) * 1e3
    results.update({"engine_stream_tok_s": round(statistics.median(eng), 1),
                    "bare_generator_tok_s": round(statistics.median(base_tps), 1),
                    "paired_ratio_median": paired(eng, base_tps)["median"], "paired_ratio_iqr": paired(eng, base_tps)["iqr"],
                    "engine_stream_all": [round(x, 1) for x in eng], "bare_all": [round(x, 1) for x in base_tps],
                    "one_stream_step_wall_ms": round(host_ms, 3)})
    log.info("one stream: engine %.1f tok/s, bare %.1f tok/s, ratio %.2f", results["engine_stream_tok_s"],
             results["bare_generator_tok_s"], results["paired_ratio_median"])
    del bare
    torch.cuda.empty_cache()

    counts = sorted({int(n) for n in a.streams.split(",")} | {backend.concurrency})
    results["streams"] = []
    for n in counts:
        r = streams(backend, n, a.prompt, a.tokens, seed=n)
        results["streams"].append(r)
        log.info("%s", r)

    results["arrivals"] = arrivals(backend)
    results["intertoken_p99_over_median"] = results["arrivals"]["intertoken_p99_over_median"]
    log.info("16 arrivals among 16 streams: %s", results["arrivals"])
    for n in (128, 2048):
        times = ttft_fresh(backend, n, a.rounds, seed=n)
        results[f"ttft_{n}_ms_median"] = round(statistics.median(times), 2)
        results[f"ttft_{n}_ms_all"] = [round(x, 2) for x in times]
    log.info("TTFT fresh 128: %s ms, 2048: %s ms", results["ttft_128_ms_median"], results["ttft_2048_ms_median"])
    results["gpu_memory_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    results["engine_stats"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in
                               backend.stats().items()}
    report(results, a.out)


if __name__ == "__main__":
    main()
