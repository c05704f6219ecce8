"""Llama 2 chat as a Cog model package. Importing it loads no torch and compiles nothing."""

import os

# MKL picks its matrix-product kernels by shape; under MKL_CBWR=AUTO every row of a product of 4 or
# more rows is bit-identical whatever the other rows are (docs/batch-invariance.md). It must be set before
# the process's first product, so here, before anything of ours imports torch.
os.environ.setdefault("MKL_CBWR", "AUTO")


def cdiv(a, b):
    """a / b rounded up (positive b)."""
    return -(-a // b)
