"""Every environment variable the package reads, in one place: its default and what it sets.

Read when a model is set up (never at import), through `get` and `integer`, so a bad value fails
setup with a message naming the variable. docs/configuration.md's table lists the same names and defaults.
"""

import os

VARIABLES = {  # name: (default, what it sets)
    "COG_WEIGHTS": ("", "the model folder, or an https URL of a .tar/.tar.gz of it or of a folder with SHA256SUMS "
                    "(else weights/llama-2-7b-chat; the demo model only when named)"),
    "LLAMA_PKG_WEIGHTS_CACHE": ("weights/.downloads", "where weights given as a URL are downloaded, once per URL"),
    "LLAMA_PKG_BACKEND": ("", "force a backend: batched, transformers or exllamav2 (else chosen from the folder)"),
    "LLAMA_PKG_MAX_BATCH": ("8", "predictions the batched engine runs at once; Cog's concurrency"),
    "LLAMA_PKG_PREFILL_CHUNK": ("128", "prompt positions prefilled per engine step (a multiple of the block size)"),
    "LLAMA_PKG_KV_CACHE_MB": ("1024", "memory for the KV block pool (raised to hold one full context); 0: "
                              "what the GPU has free after the model, less LLAMA_PKG_GPU_RESERVE_MB"),
    "LLAMA_PKG_GPU_RESERVE_MB": ("4096", "GPU memory left out of an automatic KV pool (graphs, activations, "
                                 "cuBLAS)"),
    "LLAMA_PKG_CPU_WEIGHTS": ("int4", "the CPU engine's Linears: int4 (float weights in 4-bit groups of 32, "
                              "quantized at load), int8 (one scale per output channel), or float32 (the reference: "
                              "float32 matmuls, GPTQ unpacked); GPTQ weights run 4-bit unless float32; the lm head is "
                              "int8 unless float32"),
    "LLAMA_PKG_CPU_PROMPT": ("dense", "how prompt rows multiply on the CPU when the weights were quantized at load: "
                             "dense (bf16 products over a copy of the quantized weights, 2 bytes a weight; faster "
                             "prefill) or integer (the integer kernels, no copy); GPTQ weights always integer"),
    "LLAMA_PKG_CPU_KERNELS": ("auto", "the CPU engine's integer products (Linears, lm head) and decode step: auto (the "
                              "package's kernels, int8 activations in blocks of 32, built with the system's C++ "
                              "compiler at the first CPU load; where they cannot be, ATen's kernels and torch "
                              "operations, with a warning), on (the package's or fail), off (ATen's, bf16 "
                              "activations)"),
    "LLAMA_PKG_KERNEL_CACHE": ("~/.cache/llama_pkg", "where the package's CPU kernel is built and found"),
    "LLAMA_PKG_KV_BLOCK": ("16", "positions per KV cache block"),
    "LLAMA_PKG_CUDA_GRAPHS": ("1", "0 runs every CUDA engine step eagerly (no graphs: for debugging)"),
    "LLAMA_PKG_DENSE_WEIGHTS": ("auto", "an fp16 copy of GPTQ weights on CUDA for batches over 32 rows: 1, 0, or auto "
                                "(when it takes at most half the GPU memory left after the 4-bit weights)"),
    "LLAMA_PKG_METRICS_PORT": ("0", "a port for Prometheus metrics of the process that holds the engine (/metrics); "
                               "0: none"),
    "LLAMA_PKG_STOP_GRACE_S": ("25", "seconds `serve` gives running predictions to finish once asked to stop "
                               "(SIGTERM, Ctrl-C) before it cancels them, billed what they streamed; a second "
                               "signal cancels at once"),
    "LLAMA_PKG_STOP_FIFO": ("", "set by `serve` for its worker: the pipe through which it cancels the running "
                            "predictions when it stops (not a user setting)"),
    "LLAMA_PKG_LOG_PROMPTS": ("0", "1 logs each prompt's text (off: prompts are the users' data)"),
    "LLAMA_PKG_EXL2_ATTENTION": ("matmul", "ExLlamaV2's attention: matmul or sdpa (with this package's causal fix)"),
    "LLAMA_PKG_ALLOW_COMPILE": ("0", "1 lets setup compile the ExLlamaV2 extension (about 2 minutes)"),
    "TORCH_EXTENSIONS_DIR": ("/opt/exllamav2-ext", "where the ExLlamaV2 extension is built and found"),
    "MKL_CBWR": ("AUTO", "set on import, before torch's first matrix product: float32 CPU rows of 4 or more "
                 "rows alike (LLAMA_PKG_CPU_WEIGHTS=float32)"),
}


# Where the batched engine runs on CUDA, these defaults replace the ones above. 128: the largest batch
# measured (H200, 2026-11-27: aggregate tok/s still rising with the batch, per-stream falling below 50
# above 48 rows; benchmarks/RESULTS.md); 0: the KV pool takes the free GPU memory. docs/configuration.md's table
# has them in its own column.
CUDA_DEFAULTS = {"LLAMA_PKG_MAX_BATCH": "128", "LLAMA_PKG_PREFILL_CHUNK": "512", "LLAMA_PKG_KV_CACHE_MB": "0"}


def get(name, cuda=False):
    default = CUDA_DEFAULTS.get(name, VARIABLES[name][0]) if cuda else VARIABLES[name][0]
    return os.environ.get(name, default).strip()


def integer(name, low=1, cuda=False):
    value = get(name, cuda)
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low:
        raise ValueError(f"{name}={value!r}: must be an integer of at least {low} ({VARIABLES[name][1]})")
    return number


def choice(name, allowed):
    value = get(name)
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(a or repr(a) for a in allowed)}")
    return value
