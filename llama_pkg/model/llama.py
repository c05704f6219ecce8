"""The Llama forward pass the package owns, in the spirit of gpt-fast's model.py: every shape from
config.json, one flat batch of rows (decode steps and prompt chunks side by side), a pluggable Linear
(ATen's integer kernels on the CPU: cpu_linear.py; float32 matmul as the reference setting; ExLlamaV2's
GPTQ kernels on CUDA) and a pluggable attention (model/attention.py). Why float32 matmul steps never have
fewer than MIN_ROWS rows: docs/batch-invariance.md.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .fused import TORCH

MIN_ROWS = 4  # rows of a step whose Linears are float32 matmuls (MKL); the integer kernels need no padding


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    context_length: int

    @classmethod
    def from_dict(cls, c, where="config.json"):
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"{where}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                             "(only Llama's default RoPE)")
        if c.get("hidden_act", "silu") != "silu" or c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError(f"{where}: only the Llama architecture (SiLU, no biases) is supported")
        heads = int(c["num_attention_heads"])
        return cls(vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
                   intermediate_size=int(c["intermediate_size"]), layers=int(c["num_hidden_layers"]), heads=heads,
                   kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
                   rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                   rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                   tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                   context_length=int(c.get("max_position_embeddings", 4096)))


class Linear:
    """y = x @ W.T over float weights; the CPU's linear layer."""

    def __init__(self, weight):
        self.weight = weight

    def __call__(self, x):
        return F.linear(x, self.weight)


class FloatLinears:
    """make_linear over float weights: the prefixes of Linears that read one input -> one fused Linear."""

    def __init__(self, take):
        self.take = take

    def __call__(self, prefixes):
        return Linear(torch.cat([self.take(p + ".weight") for p in prefixes]))



class KVCache:
    """Keys and values of every layer: [blocks * block_size, kv_heads, head_dim] each, one slot per position.
    On the CPU each tensor is an anonymous memory map: the system hands out zero pages as positions are first
    written, so the process's memory grows with the positions used, not with the pool's size (a 7B model's
    pool of one full context is 2.1 GB in bf16, more than half its 4-bit weights)."""

    def __init__(self, config, blocks, block_size, device, dtype):
        shape = (blocks * block_size, config.kv_heads, config.head_dim)
        self.keys = [_zeros(shape, device, dtype) for _ in range(config.layers)]
        self.values = [_zeros(shape, device, dtype) for _ in range(config.layers)]

    def layer(self, i):
        return self.keys[i], self.values[i]

    @staticmethod
    def bytes_per_token(config, dtype):
        return 2 * config.layers * config.kv_heads * config.head_dim * torch.finfo(dtype).bits // 8


def _zeros(shape, device, dtype):
    """torch.zeros, but on the CPU in an anonymous memory map: zero pages the system commits when first
    written (torch.zeros writes every byte at once; calloc may, below glibc's mmap threshold)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    import math
    import mmap

    nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class Llama:
    def __init__(self, config, weights, make_linear=None, make_head=None, device="cpu", dtype=torch.float32,
                 min_rows=MIN_ROWS, kv_dtype=None):
        """weights: the Hugging Face state dict of a LlamaForCausalLM (float tensors; the packed Linears
        may be absent when make_linear builds them: exllama_linear.Linears, cpu_linear.CpuLinears).
        make_linear(prefixes) -> a callable for the Linears of those prefixes, fused (one input, outputs
        side by side); make_head(weight) -> the lm head's (float matmul unless given). min_rows: the fewest
        rows a step computes (the model runner pads): 1 where the Linears' rows do not depend on their count."""
        self.config = c = config
        self.device, self.dtype = torch.device(device), dtype

        def take(name):
            return weights[name].to(device=device, dtype=dtype)

        self.min_rows = min_rows
        self.kv_dtype = kv_dtype or dtype  # the KV cache's
        make_linear = make_linear or FloatLinears(take)
        self.embed = weights["model.embed_tokens.weight"].to(device=device)  # its own dtype: rows cast on lookup
        self.norm = take("model.norm.weight")
        tied = c.tie_word_embeddings or "lm_head.weight" not in weights
        head = self.embed.to(dtype) if tied else take("lm_head.weight")  # the tied matrix read once
        self.lm_head = make_head(head) if make_head else Linear(head)
        self.layers = []
        for i in range(c.layers):
            p = f"model.layers.{i}."
            self.layers.append(dict(
                attn_norm=take(p + "input_layernorm.weight"), mlp_norm=take(p + "post_attention_layernorm.weight"),
                qkv=make_linear([p + f"self_attn.{n}_proj" for n in "qkv"]), o=make_linear([p + "self_attn.o_proj"]),
                gate_up=make_linear([p + "mlp.gate_proj", p + "mlp.up_proj"]), down=make_linear([p + "mlp.down_proj"])))
        # prompt rows through cpu_linear.PromptTiles where the Linears keep a dense copy for them
        self.dense_bytes = sum(f.dense.nbytes for layer in self.layers for f in layer.values()
                               if getattr(f, "dense", None) is not None)
        self.tiled = self.dense_bytes > 0
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        angles = torch.outer(torch.arange(c.context_length, dtype=torch.float64), inv_freq)
        # float32 tables whatever the model's dtype: fp16 angles lose the low bits of late positions
        self.cos = torch.cos(angles).to(device=device, dtype=torch.float32)
        self.sin = torch.sin(angles).to(device=device, dtype=torch.float32)

    def layers_forward(self, tokens, positions, write, cache, attention, ops=TORCH, tiles=None):
        """The decoder layers over a flat batch of rows; rows beyond len(write) are padding (not cached).
        attention(q, keys, values) -> [rows, heads, head_dim]; ops: the small operations (fused.py: plain
        torch, or Triton kernels); tiles: where prompt rows go in the CPU Linears' dense products
        (cpu_linear.PromptTiles; None: every row through the same product). Each residual add is fused with
        the RMSNorm after it, the final norm's included. Returns the final-normed hidden states."""
        c = self.config
        if tiles is not None:
            def linear(f, x):
                return f(x, tiles)
        else:
            def linear(f, x):
                return f(x)
        x = self.embed.index_select(0, tokens).to(self.dtype)
        h = F.rms_norm(x, self.layers[0]["attn_norm"].shape, self.layers[0]["attn_norm"], c.rms_norm_eps)
        cos, sin = ops.rope_tables(self.cos.index_select(0, positions), self.sin.index_select(0, positions))
        for i, layer in enumerate(self.layers):
            keys, values = cache.layer(i)
            q = ops.rope_write(linear(layer["qkv"], h), cos, sin, write, keys, values, c.heads, c.kv_heads)
            out = attention(q, keys, values)
            x, h = ops.add_rms_norm(x, linear(layer["o"], out.reshape(out.shape[0], -1)), layer["mlp_norm"],
                                    c.rms_norm_eps)
            down = linear(layer["down"], ops.silu_mul(linear(layer["gate_up"], h)))
            norm = self.layers[i + 1]["attn_norm"] if i + 1 < len(self.layers) else self.norm
            x, h = ops.add_rms_norm(x, down, norm, c.rms_norm_eps)
        return h


def read_config(folder):
    from ..weights import read_config as read_checked

    path = Path(folder) / "config.json"
    return Config.from_dict(read_checked(path), str(path))


def load(folder, device="cpu", dtype=torch.float32, gptq=False, cpu_weights="int4", cpu_prompt="dense",
         cpu_kernels=None):
    """A Llama model folder -> Llama. On CUDA a GPTQ folder keeps its 4-bit Linears (ExLlamaV2's kernels,
    exllama_linear.py). On the CPU the Linears run on the integer kernels (cpu_linear.py): a GPTQ folder's
    repacked, a float one's quantized to cpu_weights (int4 or int8); cpu_weights="float32": every Linear
    a float32 matmul, a GPTQ folder unpacked to floats (the reference setting). cpu_prompt="dense": a float
    folder's prompt rows multiply in bf16 over a dense copy of its quantized weights (cpu_linear.PromptTiles).
    cpu_kernels: the package's kernels (cpu_kernels.Kernels) for the integer Linears and the lm head, or None
    (ATen's)."""
    from .gptq import read_tensors, unpacked_state_dict

    if gptq and torch.device(device).type == "cuda":
        return load_quantized(folder, device, dtype)
    if cpu_weights == "float32" or torch.device(device).type != "cpu":
        weights = unpacked_state_dict(folder) if gptq else read_tensors(folder)
        return Llama(read_config(folder), weights, device=device, dtype=dtype)
    from . import cpu_linear
    from .gptq import LazyTensors

    weights = LazyTensors(folder)
    model = Llama(read_config(folder), weights, make_linear=cpu_linear.CpuLinears(weights, cpu_weights, cpu_prompt, cpu_kernels),
                 make_head=lambda w: cpu_linear.head(w, cpu_kernels), device=device, dtype=dtype, min_rows=1,
                 kv_dtype=cpu_linear.BF16)  # half the float32 cache's memory and attention reads
    cpu_linear.release_freed_memory()
    return model


def load_quantized(folder, device="cuda", dtype=torch.float16):
    """A GPTQ folder whose 4-bit Linears run on ExLlamaV2's kernels (exllama_linear.py)."""
    from . import exllama_linear

    weights, linears = exllama_linear.load(folder, device)
    return Llama(read_config(folder), weights, make_linear=linears, device=device, dtype=dtype)
