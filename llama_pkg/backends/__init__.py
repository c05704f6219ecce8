"""Which backend runs a model folder, and loading it; torch and CUDA code load only with a backend.
batched: the package's own engine (llama_pkg/engine), many predictions at once, on CUDA opt-in until its
GPU checks pass; transformers: the independent reference, one at a time (hf.py); exllamav2: ExLlamaV2's
generator, one at a time, the CUDA default (exllamav2.py).
"""

from .. import settings

BACKENDS = ("batched", "transformers", "exllamav2")
FLOAT_ON_CPU_BYTES = 2 << 30  # on a CUDA machine, larger float weights are refused rather than run on the CPU


def choose(info):
    """exllamav2 for a GPTQ folder on a CUDA machine, else batched; $LLAMA_PKG_BACKEND forces one
    (batched on such a machine: the batched engine on CUDA). Large float weights on a CUDA machine are
    refused: they would run on the CPU."""
    import torch

    forced = settings.choice("LLAMA_PKG_BACKEND", ("",) + BACKENDS)
    if forced == "exllamav2" and not torch.cuda.is_available():
        raise ValueError("LLAMA_PKG_BACKEND=exllamav2 needs a CUDA device, and this machine has none (torch sees "
                         "no GPU); unset it to run on the CPU")
    if forced:
        return forced, "forced by LLAMA_PKG_BACKEND"
    if on_cuda(info):
        return "exllamav2", "GPTQ weights and a CUDA device"

    if torch.cuda.is_available():  # float weights: they run on the CPU
        params = _parameters(info.config)
        if params * 4 <= FLOAT_ON_CPU_BYTES:
            return "batched", "float weights, on the CPU (a small model: the GPU path is for GPTQ weights)"
        from ..weights import WeightsError

        raise WeightsError(f"{info.folder}: unquantized weights on a CUDA machine: this package serves them only "
                           f"on the CPU (about {params * 4 / 2**30:.1f} GiB as float32 for {params / 1e9:.2f} B "
                           "parameters); give a GPTQ 4-bit folder to run on the GPU "
                           "(`python scripts/download_weights.py`), or set LLAMA_PKG_BACKEND=batched to run these "
                           "on the CPU anyway")
    return "batched", ("GPTQ weights on the CPU's 4-bit kernels, no CUDA device" if info.is_gptq
                       else "float weights, on the CPU's integer kernels")


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


def _parameters(config):
    """A Llama's parameter count from its config.json (embeddings and lm_head counted apart)."""
    h, i, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    per_layer = h * head_dim * (2 * heads + 2 * kv) + 3 * h * i + 2 * h
    return layers * per_layer + vocab * h * (1 if config.get("tie_word_embeddings") else 2) + h
