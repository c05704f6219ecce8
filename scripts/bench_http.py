"""Predictions through Cog's HTTP server over SSE against the same requests in process, in one run.

    python scripts/bench_http.py [--weights weights/smollm2-135m-instruct] [--streams 4] [--tokens 64]
                                 [--rounds 10] [--root DIR] [--out FILE]

Every round, interleaved: --streams concurrent predictions through runtime.predict() in this process,
then the same requests (other seeds) through the server's SSE: `python -m llama_pkg serve` in another
process on the same weights, started from --root (default: this checkout; another checkout, such as an
older commit's worktree, gives a before/after). Each side has its own engine; only one side runs at a
time. For each prediction: the time to its first text chunk as its caller sees it (in process: the
first chunk out of the generator; over HTTP: the first `output` event read from the socket), and its
total time; per round: the aggregate tok/s (all tokens over the wall time). Printed as JSON: medians
and quartiles over all predictions or rounds, and the paired per-round ratio server / in process.
"""

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

from bench_stats import paired, quartiles, report  # scripts/ is on sys.path when run
from llama_pkg import runtime
from llama_pkg.pipeline import Pipeline

QUESTIONS = ["Tell me about llamas.", "What is the capital of France?", "Write a haiku about rain.",
             "Explain photosynthesis briefly.", "Name three prime numbers.", "How do airplanes fly?",
             "What is a GPU?", "Give me a recipe for pancakes."]


def inputs_for(k, round_no, tokens, side):
    return {"prompt": f"({side} {round_no}.{k}) {QUESTIONS[k % len(QUESTIONS)]}", "max_tokens": tokens,
            "min_tokens": tokens, "seed": 1000 * round_no + k}


def concurrently(n, one):
    """Run one(k) for k < n on n threads at once: (wall seconds, results)."""
    results = [None] * n
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, one(k))) for k in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def in_process(engine, inputs):
    metrics, start, first = {}, time.perf_counter(), None
    for _ in runtime.predict(engine, inputs, metrics.__setitem__):
        if first is None:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start, metrics["output_token_count"]


def lines(response):
    """A streamed response's lines as their bytes arrive (an SSE stream's). Only "\n" ends a line: JSON
    leaves other line breaks (U+2028, \r) unescaped inside a chunk."""
    pending = b""
    for data in response.iter_content(chunk_size=None):
        pending += data
        *complete, pending = pending.split(b"\n")
        yield from complete


def over_sse(url, inputs):
    start, first, completed = time.perf_counter(), None, None
    r = requests.post(f"{url}/predictions", json={"input": inputs}, headers={"Accept": "text/event-stream"},
                      stream=True, timeout=300)
    r.raise_for_status()
    event = None
    for line in lines(r):
        if line.startswith(b"event: "):
            event = line[7:].strip()
            if event == b"output" and first is None:
                first = time.perf_counter() - start
        elif line.startswith(b"data: ") and event == b"completed":
            completed = json.loads(line[6:])
    assert completed and completed["status"] == "succeeded", completed
    return first, time.perf_counter() - start, completed["metrics"]["output_token_count"]


def start_server(root, weights, port):
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONUNBUFFERED="1")
    log = open(Path(tempfile.gettempdir()) / f"bench-http-server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_pkg", "serve", "--weights", str(weights), "--port", str(port)],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: see {log.name}")
        try:
            if requests.get(f"{url}/health-check", timeout=5).json()["status"] == "READY":
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not READY in 300 s: see {log.name}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="weights/smollm2-135m-instruct")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--root", default=".", help="the checkout whose server is measured")
    ap.add_argument("--out")
    a = ap.parse_args()
    runtime.configure_logging()
    weights = Path(a.weights).resolve()
    engine = Pipeline.load(str(weights))
    proc, url = start_server(Path(a.root).resolve(), weights, free_port())
    try:
        for side in (lambda i: in_process(engine, i), lambda i: over_sse(url, i)):  # first-use costs, not measured
            concurrently(a.streams, lambda k: side(inputs_for(k, -1, a.tokens, "warm-up")))
        raw = {"in_process": {"first": [], "total": [], "tps": []}, "http_sse": {"first": [], "total": [], "tps": []}}
        for r in range(a.rounds):
            for name, one in (("in_process", lambda i: in_process(engine, i)), ("http_sse", lambda i: over_sse(url, i))):
                wall, results = concurrently(a.streams, lambda k: one(inputs_for(k, r, a.tokens, name)))
                assert all(n == a.tokens for _, _, n in results), results
                raw[name]["first"] += [f for f, _, _ in results]
                raw[name]["total"] += [t for _, t, _ in results]
                raw[name]["tps"].append(a.streams * a.tokens / wall)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "weights": a.weights, "server_root": str(Path(a.root).resolve()),
           "streams": a.streams, "tokens_per_stream": a.tokens, "rounds": a.rounds}
    for name, r in raw.items():
        out[name] = {"first_chunk_s": quartiles(r["first"]), "total_s": quartiles(r["total"]),
                     "first_chunk_share_of_total": quartiles([f / t for f, t in zip(r["first"], r["total"])]),
                     "aggregate_tps": quartiles(r["tps"])}
    out["aggregate_tps_http_over_in_process"] = paired(raw["http_sse"]["tps"], raw["in_process"]["tps"])
    report(out, a.out)


if __name__ == "__main__":
    main()
