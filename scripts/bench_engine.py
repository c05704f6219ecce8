"""Engine overhead per token over the bare backend decode loop, in the same run (a ratio, not a timing).

    python scripts/bench_engine.py [--weights DIR] [--tokens 256] [--rounds 5]

Without --weights it builds the tiny test model (where per-token model time is smallest, so the
engine's share is largest). Two figures:
- attributed: inside Engine.stream(), the time spent in the backend's iterator is clocked apart from
  the rest (detokenizing, stop matching, metering); the rest per token over the backend's per token.
  Both halves come from the same tokens, so machine noise mostly cancels.
- alternating: bare backend.generate() rounds against Engine.stream() rounds, medians (noisier).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_pkg.engine import Engine, sampling_for  # noqa: E402
from llama_pkg.metering import Meter  # noqa: E402
from llama_pkg.params import validate  # noqa: E402


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
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    weights = a.weights
    if not weights:
        import make_test_model

        weights = make_test_model.build(Path(tempfile.mkdtemp()) / "tiny-llama")
    engine = Engine.load(str(weights))
    request = validate({"prompt": "Write a long story about a llama.", "max_new_tokens": a.tokens,
                        "min_new_tokens": a.tokens, "seed": 1, "stop_sequences": "never-seen,also never"})
    ids = engine.prompt_ids(request)
    sampling = sampling_for(request, a.tokens, seed=1)
    backend_s, total_s = 0.0, 0.0
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
    for _ in range(a.rounds):
        t = time.perf_counter()
        for _ in engine.stream(request, Meter()):
            pass
        total_s += time.perf_counter() - t
    engine.backend.generate = generate
    attributed = (total_s - backend_s) / backend_s
    bare, full = [], []
    for _ in range(a.rounds):
        s, n = decode_seconds(engine.backend.generate(ids, a.tokens, sampling, engine.stop_ids))
        bare.append(s / (n - 1))
        meter = Meter()
        s, _ = decode_seconds(engine.stream(request, meter))
        full.append(s / (meter.output_token_count - 1))
    b, f = statistics.median(bare), statistics.median(full)
    print(json.dumps({"weights": str(weights), "backend": engine.backend.name, "tokens": a.tokens, "rounds": a.rounds,
                      "bare_ms_per_token": round(b * 1e3, 4), "engine_ms_per_token": round(f * 1e3, 4),
                      "overhead_percent_alternating": round((f / b - 1) * 100, 2),
                      "engine_us_per_token": round((total_s - backend_s) / (a.rounds * a.tokens) * 1e6, 1),
                      "overhead_percent_attributed": round(attributed * 100, 2)}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
