"""Does one row of a float32 product depend on how many rows the product has? Per weight shape and torch
thread count: the row counts (of 5..256) at which row 0 differs in any bit from the same row in a 4-row
product (the engine's MIN_ROWS), for F.linear and for a candidate that splits the weight's columns into
blocks and multiplies them as one batched product (docs/batch-invariance.md); and the candidate's time
against F.linear at 8 and 128 rows with 2 threads (medians of 30 interleaved calls).

    python scripts/check_row_invariance.py [--threads 2,8,16] [--out FILE]
"""

import argparse
import importlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F

importlib.import_module("llama_pkg")  # sets MKL_CBWR=AUTO before torch's first product, as the engine does

SHAPES = [(64, 128), (128, 64), (576, 1536), (1536, 576), (576, 49152), (4096, 11008), (11008, 4096)]
ROWS = (5, 8, 16, 17, 32, 64, 100, 128, 200, 256)


def column_blocks(w, blocks):
    """W [N, K] -> [blocks, K, N / blocks]: x @ each block is a slice of the output's columns."""
    n, k = w.shape
    return w.t().reshape(k, blocks, n // blocks).permute(1, 0, 2).contiguous()


def blocked_linear(x, wb):
    return torch.bmm(x.unsqueeze(0).expand(wb.shape[0], -1, -1), wb).permute(1, 0, 2).reshape(x.shape[0], -1)


def differing_rows(product, x):
    ref = product(x[:4])[0]
    return [m for m in ROWS if not torch.equal(product(x[:m])[0], ref)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="2,8,16")
    ap.add_argument("--out")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "torch": torch.__version__,
           "cores": torch.get_num_threads(), "rows_compared_with_4": ROWS, "results": []}
    for k, n in SHAPES:
        w, x = torch.randn(n, k, generator=g), torch.randn(max(ROWS), k, generator=g)
        wb = column_blocks(w, 4)
        for threads in map(int, a.threads.split(",")):
            torch.set_num_threads(threads)
            row = {"in": k, "out": n, "threads": threads,
                   "linear": differing_rows(lambda v: F.linear(v, w), x),
                   "column_blocks_4": differing_rows(lambda v: blocked_linear(v, wb), x)}
            out["results"].append(row)
            print(row, flush=True)
    torch.set_num_threads(2)
    out["seconds_2_threads"] = []
    for k, n in SHAPES[2:5]:
        w = torch.randn(n, k, generator=g)
        wb = column_blocks(w, 4)
        for m in (8, 128):
            x, times = torch.randn(m, k, generator=g), {"linear": [], "column_blocks_4": []}
            for _ in range(30):
                for name, product in (("linear", lambda: F.linear(x, w)), ("column_blocks_4", lambda: blocked_linear(x, wb))):
                    started = time.perf_counter()
                    product()
                    times[name].append(time.perf_counter() - started)
            row = {"in": k, "out": n, "rows": m, **{name: statistics.median(v) for name, v in times.items()}}
            row["ratio"] = round(row["column_blocks_4"] / row["linear"], 3)
            out["seconds_2_threads"].append(row)
            print(row, flush=True)
    if a.out:
        from bench_stats import report  # scripts/ is on sys.path when run

        report(out, a.out)


if __name__ == "__main__":
    main()
