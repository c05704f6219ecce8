"""Engine overhead per token over the bare backend decode loop, in the same run (a ratio, not a timing).

    python scripts/bench_engine.py [--weights DIR] [--tokens 256] [--rounds 10]

Without --weights it builds the tiny test model (where per-token model time is smallest, so the
engine's share is largest). Two figures:
- attributed: inside Pipeline.stream(), the time spent in the backend's iterator is clocked apart from
  the rest (detokenizing, stop matching, metering); the rest per token over the backend's per token.
  Both halves come from the same tokens, so machine noise mostly cancels.
- alternating: bare backend.generate() rounds against Pipeline.stream() rounds, interleaved (noisier).
Each is the median and interquartile range of per-round figures (a round's engine share; a round's
engine-over-bare ratio), never a ratio of medians.
"""

import repo_root  # noqa: F401  (the repository's root on sys.path: tests.model_builders)
import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_stats import quartiles  # scripts/ is on sys.path when run
from llama_pkg.metering import Meter
from llama_pkg.params import SamplingParams, validate
from llama_pkg.pipeline import Pipeline


def decode_seconds(stream):
    """Seconds from the first item to the last, and the item count (time to first token excluded)."""
    first = None
    n = 0
    for _ in stream:
        n += 1
        if first is None:
            first = time.perf_counter()
    return time.perf_counter() - first, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    weights = a.weights
    if not weights:
        from tests.model_builders import build

        weights = build(Path(tempfile.mkdtemp()) / "tiny-llama")
    engine = Pipeline.load(str(weights))
    request = validate({"prompt": "Write a long story about a llama.", "max_tokens": a.tokens,
                        "min_tokens": a.tokens, "seed": 1, "stop_sequences": "never-seen,also never"})
    ids = engine.prompt_ids(request)
    sampling = SamplingParams.of(request, a.tokens, 1)
    backend_s = 0.0
    generate = engine.backend.generate

    def clocked(*args):
        nonlocal backend_s
        it = generate(*args)
        while True:
            t = time.perf_counter()
            try:
                token = next(it)
            except StopIteration:
                return
            finally:
                backend_s += time.perf_counter() - t
            yield token

    engine.backend.generate = clocked
    attributed, engine_us = [], []
    for _ in range(a.rounds):
        backend_s = 0.0
        t = time.perf_counter()
        for _ in engine.stream(request, Meter()):
            pass
        total_s = time.perf_counter() - t
        attributed.append((total_s - backend_s) / backend_s * 100)
        engine_us.append((total_s - backend_s) / a.tokens * 1e6)
    engine.backend.generate = generate
    bare, alternating = [], []
    for _ in range(a.rounds):
        s, n = decode_seconds(engine.backend.generate(ids, a.tokens, sampling, engine.stop_ids))
        bare.append(s / (n - 1))
        meter = Meter()
        s, _ = decode_seconds(engine.stream(request, meter))
        alternating.append((s / (meter.output_token_count - 1) / bare[-1] - 1) * 100)
    print(json.dumps({"weights": str(weights), "backend": engine.backend.name, "tokens": a.tokens, "rounds": a.rounds,
                      "bare_ms_per_token": quartiles([b * 1e3 for b in bare], 3),
                      "engine_us_per_token": quartiles(engine_us, 3),
                      "overhead_percent_attributed": quartiles(attributed, 3),
                      "overhead_percent_alternating": quartiles(alternating, 3)}))


if __name__ == "__main__":
    main()
