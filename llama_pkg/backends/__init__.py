"""Which backend runs a model folder, and loading it; torch and CUDA code load only with a backend.
batched: the package's own engine (llama_pkg/engine), many predictions at once, on CUDA opt-in until its
GPU checks pass; transformers: the independent reference, one at a time (hf.py); exllamav2: ExLlamaV2's
generator, one at a time, the CUDA default (exllamav2.py).
"""

from .. import settings

BACKENDS = ("batched", "transformers", "exllamav2")


def choose(info):
    """exllamav2 for a GPTQ folder on a CUDA machine, else batched; $LLAMA_PKG_BACKEND forces one
    (batched on such a machine: the batched engine on CUDA)."""
    forced = settings.choice("LLAMA_PKG_BACKEND", ("",) + BACKENDS)
    if forced:
        return forced, "forced by LLAMA_PKG_BACKEND"
    if on_cuda(info):
        return "exllamav2", "GPTQ weights and a CUDA device"
    return "batched", "GPTQ weights unpacked to floats, no CUDA device" if info.is_gptq else "float weights"


def on_cuda(info):
    """Where the batched engine runs: CUDA for a GPTQ folder when there is a device, else the CPU."""
    import torch

    return info.is_gptq and torch.cuda.is_available()


def concurrency(name, cuda=False):
    """How many predictions the backend runs at once (Cog's slots)."""
    return settings.integer("LLAMA_PKG_MAX_BATCH", cuda=cuda) if name == "batched" else 1


def load(info, name):
    if name == "exllamav2":
        from .exllamav2 import ExLlamaV2Backend

        return ExLlamaV2Backend(info.folder, info.context_length)
    if name == "batched":
        from ..engine.llm_engine import LLMEngine

        return LLMEngine(info.folder, info.context_length, gptq=info.is_gptq, cuda=on_cuda(info))
    from .hf import TransformersBackend

    return TransformersBackend(info.folder, info.context_length, gptq=info.is_gptq)
