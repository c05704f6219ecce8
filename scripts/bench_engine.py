"""Engine overhead per token over the bare backend decode loop, in the same run (a ratio, not a timing).

    python scripts/bench_engine.py [--weights DIR] [--tokens 256] [--rounds 5]

Without --weights it builds the tiny test model (where per-token model time is smallest, so the
engine's share is largest). Bare: backend.generate() alone. Engine: Engine.stream(), i.e. rendering,
detokenizing, stop matching and metering on top. Same prompt ids, seed and settings in both.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_pkg.backends.base import Sampling  # noqa: E402
from llama_pkg.engine import Engine  # noqa: E402
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
    sampling = Sampling(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                        repetition_penalty=request.repetition_penalty, min_new_tokens=a.tokens, seed=1)
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
                      "overhead_percent": round((f / b - 1) * 100, 2)}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
