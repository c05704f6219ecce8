"""Backend choice. Only this package imports torch or CUDA code, and only when a backend is loaded."""

import os

BACKENDS = ("transformers", "exllamav2")


def choose(info):
    """exllamav2 for a GPTQ folder on a CUDA machine, else transformers; $LLAMA_PKG_BACKEND forces one."""
    forced = os.environ.get("LLAMA_PKG_BACKEND", "").strip()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"LLAMA_PKG_BACKEND={forced!r}: must be one of {', '.join(BACKENDS)}")
        return forced, "forced by LLAMA_PKG_BACKEND"
    import torch

    if info.is_gptq and torch.cuda.is_available():
        return "exllamav2", "GPTQ weights and a CUDA device"
    return "transformers", "GPTQ weights but no CUDA device" if info.is_gptq else "float weights"


def load(info, name):
    if name == "exllamav2":
        from .exllamav2 import ExLlamaV2Backend

        return ExLlamaV2Backend(info.folder, info.context_length)
    from .hf import TransformersBackend

    return TransformersBackend(info.folder, info.context_length, gptq=info.is_gptq)
