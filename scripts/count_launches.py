"""Kernel launches in one decode step, counted on the CPU: the model runner's graph body (`decode`) on a
random 32-layer model with Llama-2-7B's layout at small widths, through the paged path (the Triton
kernels in Triton's interpreter). Each aten op that does work counts one launch (views and metadata do
not), and each launch of one of the package's Triton kernels counts one. Prints JSON.

    python scripts/count_launches.py [--rows 1] [--out launches.json]
"""

import repo_root  # noqa: F401  (the repository's root on sys.path: tests.model_builders)
import argparse
import collections
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench_stats import report  # noqa: E402  (scripts/ is on sys.path when run)

NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze",
             "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind", "chunk", "narrow", "reshape",
             "lift_fresh", "_to_copy_noop", "empty", "empty_like", "empty_strided", "_local_scalar_dense"}


class Count(TorchDispatchMode):
    paused = False  # while a Triton kernel runs: in the interpreter it moves tensors about itself

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in NO_KERNEL and not Count.paused:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--ops", choices=("fused", "torch"), default="fused",
                    help="the layers' small operations: the Triton kernels, or plain torch (as before they were fused)")
    ap.add_argument("--out")
    a = ap.parse_args()
    os.environ.setdefault("LLAMA_PKG_MAX_BATCH", str(max(a.rows, 1)))
    from llama_pkg.engine.llm_engine import LLMEngine
    from llama_pkg.model import attention, fused
    from tests.model_builders import build

    folder = build(Path(tempfile.mkdtemp()) / "m", layers=32, hidden=128, heads=4, kv_heads=4, intermediate=256)
    engine = LLMEngine(folder, 4096, paged=True)
    runner = engine.runner
    runner.ops = fused.FUSED if a.ops == "fused" else fused.TORCH
    triton = collections.Counter()

    class Counted:
        """A Triton kernel whose launches (kernel[grid](...)) are counted."""

        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            triton[self.name] += 1
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                Count.paused = True
                try:
                    return launch(*args, **kwargs)
                finally:
                    Count.paused = False

            return run

    def one_step():
        inputs = runner.graphs.padding(a.rows)
        with torch.inference_mode():
            runner.decode(inputs)  # warm: the kernels are made on first use
            for module in (attention, fused):
                for name in [n for n in vars(module) if n.endswith("_KERNEL") and getattr(module, n) is not None]:
                    if not isinstance(getattr(module, name), Counted):
                        setattr(module, name, Counted(f"{module.__name__.split('.')[-1]}.{name}", getattr(module, name)))
            counter = Count()
            triton.clear()
            with counter:
                runner.decode(inputs)
        return counter.ops

    ops = engine.call(one_step)
    result = {"layers": 32, "rows": a.rows, "ops": a.ops, "aten_launches": sum(ops.values()), "triton_launches": sum(triton.values()),
              "launches_per_step": sum(ops.values()) + sum(triton.values()),
              "per_layer": round((sum(ops.values()) + sum(triton.values())) / 32, 1),
              "aten_by_op": dict(ops.most_common()), "triton_by_kernel": dict(triton)}
    report(result, a.out)


if __name__ == "__main__":
    main()
