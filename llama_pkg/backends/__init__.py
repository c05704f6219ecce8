"""Backend choice. Only this package imports torch or CUDA code, and only when a backend is loaded.

batched      the package's own engine (backends/batched.py): many predictions at once, on the CPU
transformers one prediction at a time through transformers: the independent reference
exllamav2    GPTQ on CUDA through ExLlamaV2's dynamic generator, one prediction at a time
"""

from .. import settings

BACKENDS = ("batched", "transformers", "exllamav2")


def choose(info):
    """exllamav2 for a GPTQ folder on a CUDA machine, else batched; $LLAMA_PKG_BACKEND forces one."""
    forced = settings.choice("LLAMA_PKG_BACKEND", ("",) + BACKENDS)
    if forced:
        return forced, "forced by LLAMA_PKG_BACKEND"
    import torch

    if info.is_gptq and torch.cuda.is_available():
        return "exllamav2", "GPTQ weights and a CUDA device"
    return "batched", "GPTQ weights unpacked to floats, no CUDA device" if info.is_gptq else "float weights"


def concurrency(name):
    """How many predictions the backend runs at once (Cog's slots)."""
    return settings.integer("LLAMA_PKG_MAX_BATCH") if name == "batched" else 1


def load(info, name):
    if name == "exllamav2":
        from .exllamav2 import ExLlamaV2Backend

        return ExLlamaV2Backend(info.folder, info.context_length)
    if name == "batched":
        from .batched import BatchedBackend

        return BatchedBackend(info.folder, info.context_length, gptq=info.is_gptq)
    from .hf import TransformersBackend

    return TransformersBackend(info.folder, info.context_length, gptq=info.is_gptq)
