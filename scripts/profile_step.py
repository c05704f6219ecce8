"""Where one decode step's GPU time goes, on the Llama-2-7B-shaped GPTQ checkpoint (bench_gpu.py writes it).

    python scripts/profile_step.py [--out profile.json] [--rows 1,128] [--context 384]

Runs the captured decode step's body eagerly under torch.profiler (kernels as in the graph) for each
number of `rows` sequences of `context` positions, and prints the kernels by total GPU time, grouped
as GPTQ GEMM, attention, sampler and the rest; then the graph replay's time for the same inputs.
"""

import repo_root  # noqa: F401  (the repository's root on sys.path: tests.model_builders)
import argparse
import os
import time
from pathlib import Path

import torch

from bench_cuda_engine import replay_ms, synthetic_rows  # scripts/ is on sys.path when run
from bench_stats import report
from tests.model_builders import write_checkpoint


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--folder", default="/tmp/llama-2-7b-shaped-gptq")
    ap.add_argument("--rows", default="1,128", help="row counts, comma-separated (each a graph bucket)")
    ap.add_argument("--context", type=int, default=384)
    a = ap.parse_args()
    counts = [int(n) for n in a.rows.split(",")]
    os.environ.setdefault("LLAMA_PKG_MAX_BATCH", str(max(counts)))
    os.environ.setdefault("LLAMA_PKG_KV_CACHE_MB", "0")  # what the GPU has free: 128 rows of 384 need 24 GiB
    os.environ.setdefault("LLAMA_PKG_ALLOW_COMPILE", "1")
    from llama_pkg.engine.llm_engine import LLMEngine

    folder = Path(a.folder) if (Path(a.folder) / "config.json").exists() else write_checkpoint(a.folder)
    backend = LLMEngine(folder, 4096, gptq=True, cuda=True)
    runner = backend.runner
    report({f"rows_{b}": profile(backend, runner, b, a.context) for b in counts}, a.out)


def profile(backend, runner, b, context):
    def run():
        with synthetic_rows(runner, b, context) as inputs, torch.inference_mode():
            for _ in range(3):
                runner.decode(inputs)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    runner.decode(inputs)
                torch.cuda.synchronize()
            kernels = {}
            for e in prof.key_averages():
                gpu = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
                if gpu:
                    kernels[e.key] = kernels.get(e.key, 0) + gpu / 5 / 1e3  # ms per step
            graph_ms = replay_ms(runner.graphs.graphs[b])
            t = time.perf_counter()
            for _ in range(20):
                runner.decode(inputs)
            torch.cuda.synchronize()
            return kernels, graph_ms, (time.perf_counter() - t) / 20 * 1e3

    kernels, graph_ms, eager_ms = backend.call(run)

    def group(name):
        n = name.lower()
        if "gemm_half_q_half" in n or "gptq" in n or "reconstruct" in n:
            return "gptq_gemm"
        if "decode_kernel" in n:
            return "attention (Triton)"
        if "gemm" in n or "gemv" in n or "cutlass" in n or "sm90" in n:
            return "cuBLAS (lm_head)"
        if "sort" in n or "scan" in n or "cumsum" in n or "radix" in n:
            return "sampler sort/scan"
        return "other"

    groups = {}
    for k, v in kernels.items():
        groups[group(k)] = groups.get(group(k), 0) + v
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return {"device": torch.cuda.get_device_name(0), "rows": b, "context": context,
              "graph_replay_ms": round(graph_ms, 3), "eager_step_wall_ms": round(eager_ms, 3),
              "kernel_ms_total": round(sum(kernels.values()), 3),
              "groups_ms": {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
              "top_kernels_ms": [[k[:90], round(v, 4)] for k, v in top]}


if __name__ == "__main__":
    main()
