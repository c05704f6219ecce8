"""The CPU engine beside llama.cpp, in one run, rounds interleaved (issue 26's figures; not part of `make test`).

llama.cpp runs in its own virtual environment, built from source (10 to 40 minutes on 2 cores):
    python3.11 -m venv /work/llamacpp-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
        /work/llamacpp-venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
    python scripts/bench_cpu_peer.py --llama-python /work/llamacpp-venv/bin/python [--rounds 5] [--out FILE]

Both decode the demo model from the same GGUF (the Q4_1 SmolLM2 file `scripts/make_demo_model.py` converts),
the same prompt ids, greedy, exactly --tokens new tokens, with the machine's threads; llama.cpp's child process
is stopped (SIGSTOP) while the package runs, and the package's engine idles while llama.cpp runs. Also: the
package's 8 streams at once (aggregate decode tok/s), the time to the first token of a 512-token prompt on the integer path over the float32 path,
and a Llama-2-7B-shaped random 4-bit GPTQ checkpoint (made here, about 3.9 GB) in a process of its own:
decode tok/s, its bound (this machine's copy bandwidth / the weight bytes a token reads), RSS / checkpoint after
3 x 16 tokens and with one full context's KV slots written.
"""

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_stats import paired, quartiles, report  # scripts/ is on sys.path when run
from repo_root import ROOT

DEMO = ROOT / "weights" / "smollm2-135m-instruct"
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
CHILD = r"""
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), n_ctx=2048, verbose=False)
for line in sys.stdin:
    ids, n = json.loads(line)["ids"], json.loads(line)["tokens"]
    llm.reset()
    times = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        times.append(time.perf_counter())
        if len(times) == n:
            break
    print(json.dumps({"decode_tok_s": (n - 1) / (times[-1] - times[0])}), flush=True)
"""


def package_stream(engine, prompt_ids, tokens):
    """Decode tok/s of one greedy stream of exactly `tokens` new ids (first token excluded)."""
    from llama_pkg.params import SamplingParams

    params = SamplingParams(temperature=0, repetition_penalty=1.0, min_new_tokens=tokens)
    times = [time.perf_counter() for _ in engine.generate(prompt_ids, tokens, params, frozenset())]
    return (len(times) - 1) / (times[-1] - times[0])


def package_streams(engine, prompt_ids, tokens, streams):
    """Aggregate decode tok/s of `streams` greedy streams at once (from the last first token to the end)."""
    from llama_pkg.params import SamplingParams

    firsts, lasts = [], []

    def one(i):
        params = SamplingParams(temperature=0.7, seed=i, min_new_tokens=tokens)
        times = [time.perf_counter() for _ in engine.generate(prompt_ids + [i + 10], tokens, params, frozenset())]
        firsts.append(times[0])
        lasts.append(times[-1])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return streams * (tokens - 1) / (max(lasts) - max(firsts))


def ttft(engine, prompt_ids):
    from llama_pkg.params import SamplingParams

    start = time.perf_counter()
    next(iter(engine.generate(prompt_ids, 1, SamplingParams(temperature=0), frozenset())))
    return time.perf_counter() - start


def engine_for(kind, folder=DEMO, gptq=False):
    os.environ["LLAMA_PKG_CPU_WEIGHTS"] = kind
    from llama_pkg.engine.llm_engine import LLMEngine

    return LLMEngine(str(folder), 4096, gptq=gptq)


def ttft_child():
    """Child mode: the float32 engine, one time to first token per line of prompt ids (a process of its own:
    two engines in one process slow each other through their OpenMP threads)."""
    engine = engine_for("float32")
    print("ready", flush=True)
    for line in sys.stdin:
        print(ttft(engine, json.loads(line)), flush=True)


def copy_bandwidth():
    """Bytes read and written per second copying 1 GiB (median of 5)."""
    import torch

    a, b = torch.ones(2**28), torch.empty(2**28)
    seconds = []
    for _ in range(6):
        start = time.perf_counter()
        b.copy_(a)
        seconds.append(time.perf_counter() - start)
    return 2 * a.numel() * 4 / sorted(seconds[1:])[2]


def rss_bytes():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def seven_b(folder, tokens):
    """Child mode: load the 7B-shaped GPTQ folder on the CPU engine, decode, report tok/s and memory."""
    engine = engine_for("int4", folder, gptq=True)
    ids = [1] + list(range(400, 440))
    rates = [package_stream(engine, ids, tokens) for _ in range(3)]
    cache = engine.runner.cache
    measured = {"decode_tok_s": rates, "rss_bytes": rss_bytes(),
                "kv_pool_bytes": sum(t.nbytes for t in cache.keys + cache.values),
                "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    # the pool's pages are committed as positions are written: write one full context's slots (what a
    # 4096-token conversation holds) and measure again
    slots = engine.context_length
    engine.call(lambda: [t[:slots].fill_(0) for t in cache.keys + cache.values])
    measured["rss_full_context_bytes"] = rss_bytes()
    return measured


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-python", required=True, help="the python of a venv with llama-cpp-python")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--seven-b-dir", default="/tmp/llama-2-7b-shaped-gptq")
    ap.add_argument("--seven-b-child", help=argparse.SUPPRESS)
    ap.add_argument("--ttft-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.ttft_child:
        return ttft_child()
    if a.seven_b_child:
        print(json.dumps(seven_b(a.seven_b_child, 16)))
        return
    import torch

    from make_demo_model import GGUF, fetch_gguf

    threads = torch.get_num_threads()
    work = tempfile.mkdtemp()
    gguf = fetch_gguf(work) / GGUF
    child = subprocess.Popen([a.llama_python, "-c", CHILD, str(gguf), str(threads)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    floats = subprocess.Popen([sys.executable, __file__, "--llama-python", a.llama_python, "--ttft-child"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert floats.stdout.readline().strip() == "ready"
    os.kill(floats.pid, signal.SIGSTOP)
    from llama_pkg.pipeline import Pipeline

    pipe = Pipeline.load(str(DEMO))  # the chat template's prompt ids, as a user's request has them
    from llama_pkg.params import Request

    prompt_ids = pipe.prompt_ids(Request(prompt=PROMPT))
    pipe.backend.close()  # one engine in this process at a time (the float32 one is a child)
    int_engine = engine_for("int4")
    step = int_engine.runner.step
    kernel = f"the package's ({step.kernels.isa}), decode step in C" if step else "ATen's (LLAMA_PKG_CPU_KERNELS)"
    long_ids = (prompt_ids * 8)[:511]
    rows = {k: [] for k in ("package", "llama_cpp", "streams8", "ttft_int", "ttft_float")}
    for r in range(a.rounds):
        os.kill(child.pid, signal.SIGSTOP)  # llama.cpp's idle threads may poll: stopped while the package runs
        rows["package"].append(package_stream(int_engine, prompt_ids, a.tokens))
        os.kill(child.pid, signal.SIGCONT)
        child.stdin.write(json.dumps({"ids": prompt_ids, "tokens": a.tokens}) + "\n")
        child.stdin.flush()
        rows["llama_cpp"].append(json.loads(child.stdout.readline())["decode_tok_s"])
        os.kill(child.pid, signal.SIGSTOP)
        rows["streams8"].append(package_streams(int_engine, prompt_ids, 64, 8))
        fresh = long_ids[:1] + [1000 + r] + long_ids[1:]  # new from its second id: no prefix reuse
        for key in ("ttft_int", "ttft_float") if r % 2 == 0 else ("ttft_float", "ttft_int"):
            if key == "ttft_int":
                rows[key].append(ttft(int_engine, fresh))
                continue
            os.kill(floats.pid, signal.SIGCONT)
            floats.stdin.write(json.dumps(fresh) + "\n")
            floats.stdin.flush()
            rows[key].append(float(floats.stdout.readline()))
            os.kill(floats.pid, signal.SIGSTOP)
        print(r, {k: round(v[-1], 3) for k, v in rows.items()}, flush=True)
        os.kill(child.pid, signal.SIGCONT)
    child.stdin.close()
    child.wait()
    int_engine.close()
    os.kill(floats.pid, signal.SIGCONT)
    floats.stdin.close()
    floats.wait()

    from tests import model_builders

    folder = Path(a.seven_b_dir)
    if not (folder / "config.json").exists():
        model_builders.write_checkpoint(folder, device="cpu")
    checkpoint = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    s = model_builders.SHAPE
    layer_weights = s["layers"] * (4 * s["hidden"] ** 2 + 3 * s["hidden"] * s["intermediate"])
    bytes_per_token = layer_weights // 2 + layer_weights // s["group"] * 4 + s["vocab"] * s["hidden"]  # 4-bit,
    # a bf16 scale and zero per group, the int8 lm head
    bandwidth = copy_bandwidth()
    seven = json.loads(subprocess.run([sys.executable, __file__, "--llama-python", a.llama_python, "--seven-b-child",
                                       str(folder)], capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    version = subprocess.run([a.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    rate7 = quartiles(seven["decode_tok_s"], 3)
    bound = bandwidth / bytes_per_token
    report({
        "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpu": cpu_name(), "threads": threads,
        "torch": torch.__version__, "llama_cpp_python": version, "rounds": a.rounds, "new_tokens": a.tokens,
        "prompt_tokens": len(prompt_ids), "package_cpu_weights": "int4 groups of 32 (lm head int8)",
        "package_cpu_kernel": kernel,
        "package_one_stream_tok_s": quartiles(rows["package"], 2),
        "llama_cpp_one_stream_tok_s": quartiles(rows["llama_cpp"], 2),
        "one_stream_ratio_package_over_llama_cpp": paired(rows["package"], rows["llama_cpp"]),
        "package_8_streams_tok_s": quartiles(rows["streams8"], 2),
        "package_8_streams_over_llama_cpp_one_stream": paired(rows["streams8"], rows["llama_cpp"]),
        "ttft_512_seconds_int4": quartiles(rows["ttft_int"], 3), "ttft_512_seconds_float32": quartiles(rows["ttft_float"], 3),
        "ttft_512_ratio_vs_float32": paired(rows["ttft_int"], rows["ttft_float"]),
        "gptq_7b_one_stream_tok_s": rate7,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2), "gptq_7b_weight_bytes_per_token": bytes_per_token,
        "gptq_7b_bandwidth_bound_tok_s": round(bound, 3),
        "gptq_7b_fraction_of_bound": round(rate7["median"] / bound, 3),
        "gptq_7b_checkpoint_bytes": checkpoint, "gptq_7b_rss_bytes": seven["rss_bytes"],
        "gptq_7b_rss_over_checkpoint": round(seven["rss_bytes"] / checkpoint, 3),
        "gptq_7b_peak_rss_over_checkpoint": round(seven["max_rss_bytes"] / checkpoint, 3),
        "gptq_7b_kv_pool_bytes": seven["kv_pool_bytes"],  # bf16, at least one full context (4096 positions);
        # anonymous memory maps: resident only where written
        "gptq_7b_rss_full_context_bytes": seven["rss_full_context_bytes"],
        "gptq_7b_rss_full_context_over_checkpoint": round(seven["rss_full_context_bytes"] / checkpoint, 3),
        "raw": rows,
    }, a.out)


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
