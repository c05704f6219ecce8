"""Llama 2 chat as a Cog model package. Importing it loads no torch and compiles nothing.

    import llama_pkg
    model = llama_pkg.load("weights/smollm2-135m-instruct")   # or None: $COG_WEIGHTS, weights/llama-2-7b-chat
    answer = model.generate(prompt="What is the capital of France?", max_tokens=32, temperature=0)
    print(answer.text, answer.metrics)
    for chunk in model.stream(prompt="Tell me about llamas"):
        print(chunk, end="", flush=True)
"""

import os

from .params import InputError  # a bad input, named: `e.field`

__all__ = ["InputError", "cdiv", "load"]

# MKL picks its matrix-product kernels by shape; under MKL_CBWR=AUTO every row of a product of 4 or
# more rows is bit-identical whatever the other rows are (docs/batch-invariance.md). It must be set before
# the process's first product, so here, before anything of ours imports torch.
os.environ.setdefault("MKL_CBWR", "AUTO")


def cdiv(a, b):
    """a / b rounded up (positive b)."""
    return -(-a // b)


def load(weights=None):
    """A Model on the weights (a folder or an https URL; None: $COG_WEIGHTS, else weights/llama-2-7b-chat),
    with `generate(**inputs)` and `stream(**inputs)` (llama_pkg/api.py)."""
    from .api import Model

    return Model.load(weights)
