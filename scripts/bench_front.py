"""The OpenAI-compatible front against Cog's API directly, the same predictions, in one run.

    python scripts/bench_front.py [--weights DIR] [--streams 8] [--tokens 64] [--rounds 10] [--alone 5]
                                  [--out FILE]

One `llama-pkg serve` on the weights and one `llama-pkg openai` in front of it. Every round, interleaved:
one stream alone through Cog's SSE then through the front, --alone times (time to the first text chunk as
the client reads it), then --streams at once through each (aggregate tok/s over the wall time). Both sides send
the same prediction: the Cog side's inputs are what the front makes of the chat request
(openai_api.chat_inputs), other seeds each round. Printed as JSON: medians and quartiles, and the paired
per-round differences and ratios front / Cog.
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import requests

from bench_http import QUESTIONS, concurrently, free_port, lines, start_server  # scripts/ is on sys.path when run
from bench_stats import paired, quartiles, report
from llama_pkg.openai_api import chat_inputs

MODEL = "bench"
SETTLE_S = 0.5  # before each burst, not measured
RETRIES = {"predictions": 0, "v1": 0}  # requests refused for a busy slot, then retried: Cog's, the front's


def body_for(k, round_no, tokens):
    return {"model": MODEL, "messages": [{"role": "user", "content": f"({round_no}.{k}) {QUESTIONS[k % len(QUESTIONS)]}"}],
            "max_tokens": tokens, "min_tokens": tokens, "seed": 1000 * (round_no + 1) + k, "stream": True,
            "stream_options": {"include_usage": True}}


def post(url, **kwargs):
    """POST, retried while every slot is busy (Cog's 409, the front's 429), as a client does: coglet 0.23.1
    sometimes frees a slot a moment after its answer. The retries are counted and reported."""
    while (r := requests.post(url, stream=True, timeout=300, **kwargs)).status_code in (409, 429):
        RETRIES[url.split("/")[3]] += 1
        time.sleep(0.02)
    r.raise_for_status()
    return r


def via_cog(url, body):
    """(first chunk s, total s, output tokens) through Cog's SSE."""
    start, first, event, tokens = time.perf_counter(), None, None, None
    r = post(f"{url}/predictions", json={"input": chat_inputs(body, MODEL)[0]}, headers={"Accept": "text/event-stream"})
    for line in lines(r):  # each event's JSON read, as the front reads each of its chunks
        if line.startswith(b"event: "):
            event = line[7:].strip()
        elif line.startswith(b"data: "):
            data = json.loads(line[6:])
            if event == b"output" and first is None and data["chunk"]:
                first = time.perf_counter() - start
            elif event == b"completed":
                assert data["status"] == "succeeded", data
                tokens = data["metrics"]["output_token_count"]
    return first, time.perf_counter() - start, tokens


def via_front(url, body):
    """(first chunk s, total s, output tokens) through the front's /v1/chat/completions stream."""
    start, first, tokens = time.perf_counter(), None, None
    r = post(f"{url}/v1/chat/completions", json=body)
    for line in lines(r):
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - start, tokens


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def start_front(upstream, port):
    log = open(Path("/tmp") / f"bench-front-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_pkg", "openai", "--upstream", upstream, "--port", str(port),
                             "--model-name", MODEL], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    raise SystemExit(f"the front did not start: see {log.name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="weights/smollm2-135m-instruct")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--alone", type=int, default=5, help="single-stream pairs per round (time to first token)")
    ap.add_argument("--out")
    a = ap.parse_args()
    os.environ.setdefault("LLAMA_PKG_MAX_BATCH", str(a.streams))  # Cog's slots: every stream at once
    weights = Path(a.weights).resolve()
    server, cog_url = start_server(Path(".").resolve(), weights, free_port())
    front = None
    try:
        front, front_url = start_front(cog_url, free_port())
        sides = {"cog": lambda b: via_cog(cog_url, b), "front": lambda b: via_front(front_url, b)}
        for one in sides.values():  # first-use costs, not measured
            concurrently(a.streams, lambda k: one(body_for(k, -1, a.tokens)))
        raw = {name: {"ttft_alone": [], "ttft_batch": [], "tps": []} for name in sides}
        for r in range(a.rounds):
            for k in range(a.alone):
                for name, one in sides.items():
                    first, _, n = one(body_for(k, r, a.tokens))
                    assert n == a.tokens, (name, n)
                    raw[name]["ttft_alone"].append(first)
            for name, one in sides.items():
                time.sleep(SETTLE_S)
                wall, results = concurrently(a.streams, lambda k: one(body_for(k, r, a.tokens)))
                assert all(n == a.tokens for _, _, n in results), (name, results)
                raw[name]["ttft_batch"] += [f for f, _, _ in results]
                raw[name]["tps"].append(a.streams * a.tokens / wall)
    finally:
        for proc in (front, server):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "versions": {name: _version(name) for name in ("torch", "coglet", "starlette", "uvicorn", "uvloop",
                                                          "httptools", "aiohttp")}, "weights": a.weights, "streams": a.streams, "tokens_per_stream": a.tokens,
           "rounds": a.rounds, "alone_pairs_per_round": a.alone}
    for name, r in raw.items():
        out[name] = {"ttft_alone_s": quartiles(r["ttft_alone"]), f"ttft_at_{a.streams}_streams_s": quartiles(r["ttft_batch"]),
                     "aggregate_tps": quartiles(r["tps"])}
    out["ttft_alone_front_minus_cog_ms"] = quartiles(
        [1000 * (f - c) for f, c in zip(raw["front"]["ttft_alone"], raw["cog"]["ttft_alone"])], 3)
    out["aggregate_tps_front_over_cog"] = paired(raw["front"]["tps"], raw["cog"]["tps"])
    out["busy_retries"] = {"cog": RETRIES["predictions"], "front": RETRIES["v1"]}
    report(out, a.out)


if __name__ == "__main__":
    main()
