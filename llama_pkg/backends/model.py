"""The Llama forward pass the package owns, in the spirit of gpt-fast's model.py.

    embeddings -> N x (RMSNorm, attention with RoPE and grouped-query heads, RMSNorm, SwiGLU MLP)
               -> RMSNorm -> lm_head

Every shape and constant comes from the folder's config.json. One forward runs a flat batch: the
rows of several sequences (decode steps of one token, prefill chunks of many) side by side, with the
keys and values of every sequence in one paged cache (kv_cache.py). The linear layers see all rows
at once; attention runs per sequence over its own blocks only.

Rows are never fewer than MIN_ROWS: on the CPU, MKL computes a matrix product of 1 to 3 rows with
other kernels than one of 4 or more (so its last bits differ), while with MKL_CBWR=AUTO (settings.py)
every row of a product of 4 or more rows is bit-identical whatever the other rows are. Padding to 4
makes a request's logits independent of the batch it shares; on this machine 4 rows cost no more
than 1, the product being bound by reading the weights.

The linear layers are pluggable: `Linear` here is a float matmul (float folders, and GPTQ folders
unpacked to floats); on CUDA, gptq_cuda.py puts ExLlamaV2's GPTQ kernels behind the same call. So is
attention: `forward` attends per sequence (the CPU path); cuda_step.py runs the same layers with the
paged Triton decode kernel and SDPA prefill.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MIN_ROWS = 4


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


@dataclass
class Rows:
    """One sequence's rows in a flat batch: `start` and `count` index the batch; its positions are
    `position`..`position + count - 1`; `slots` are the cache slots of positions 0..position+count-1."""

    start: int
    count: int
    position: int
    slots: torch.Tensor
    logits: bool = True  # whether its last row's logits are wanted
    prefill: bool = False  # prompt rows: attention computed as for at least MIN_ROWS queries


def rms_norm(x, weight, eps):
    return F.rms_norm(x, weight.shape, weight, eps)


class Llama:
    def __init__(self, config, weights, make_linear=None, device="cpu", dtype=torch.float32):
        """weights: the Hugging Face state dict of a LlamaForCausalLM (float tensors; the packed Linears
        may be absent when make_linear builds them, gptq_cuda.Linears). make_linear(prefixes) -> a
        callable for the Linears of those prefixes, fused (one input, outputs side by side)."""
        self.config = c = config
        self.device, self.dtype = torch.device(device), dtype

        def take(name):
            return weights[name].to(device=device, dtype=dtype)

        make_linear = make_linear or FloatLinears(take)
        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight")
        head = self.embed if c.tie_word_embeddings or "lm_head.weight" not in weights else take("lm_head.weight")
        self.lm_head = Linear(head)
        self.layers = []
        for i in range(c.layers):
            p = f"model.layers.{i}."
            self.layers.append(dict(
                attn_norm=take(p + "input_layernorm.weight"), mlp_norm=take(p + "post_attention_layernorm.weight"),
                qkv=make_linear([p + f"self_attn.{n}_proj" for n in "qkv"]), o=make_linear([p + "self_attn.o_proj"]),
                gate_up=make_linear([p + "mlp.gate_proj", p + "mlp.up_proj"]), down=make_linear([p + "mlp.down_proj"])))
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        angles = torch.outer(torch.arange(c.context_length, dtype=torch.float64), inv_freq)
        # float32 tables whatever the model's dtype: fp16 angles lose the low bits of late positions
        self.cos = torch.cos(angles).to(device=device, dtype=torch.float32)
        self.sin = torch.sin(angles).to(device=device, dtype=torch.float32)

    def rope(self, x, cos, sin):
        """Rotate half-split pairs (the Hugging Face layout): x [rows, heads, head_dim]."""
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def layers_forward(self, tokens, positions, write, cache, attention):
        """The decoder layers over a flat batch of rows; rows beyond len(write) are padding (not cached).
        attention(q, keys, values) -> [rows, heads, head_dim]. Returns the final-normed hidden states."""
        c = self.config
        n = write.shape[0]
        x = self.embed[tokens]
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer["attn_norm"], c.rms_norm_eps)
            qkv = layer["qkv"](h).view(-1, c.heads + 2 * c.kv_heads, c.head_dim)
            qk = self.rope(qkv[:, :c.heads + c.kv_heads], cos, sin)  # queries and keys rotate alike
            q, k, v = qk[:, :c.heads], qk[:, c.heads:], qkv[:, c.heads + c.kv_heads:]
            keys, values = cache.layer(i)
            keys.index_copy_(0, write, k[:n])
            values.index_copy_(0, write, v[:n])
            out = attention(q, keys, values)
            x = x + layer["o"](out.reshape(out.shape[0], -1))
            h = rms_norm(x, layer["mlp_norm"], c.rms_norm_eps)
            gate, up = layer["gate_up"](h).chunk(2, dim=-1)
            x = x + layer["down"](F.silu(gate) * up)
        return rms_norm(x, self.norm, c.rms_norm_eps)

    @torch.inference_mode()
    def forward(self, tokens, positions, seqs, cache, all_logits=False):
        """tokens, positions: [rows] (a flat batch); seqs: list of Rows; cache: kv_cache.KVCache.

        Writes every row's keys and values into the cache at its sequence's slots, and returns the
        logits of each sequence's last row ([len(seqs), vocab]; [rows, vocab] with all_logits)."""
        n = tokens.shape[0]
        if n < MIN_ROWS:  # see the module docstring; the padding rows attend to nothing
            pad = MIN_ROWS - n
            tokens = torch.cat([tokens, tokens.new_zeros(pad)])
            positions = torch.cat([positions, positions.new_zeros(pad)])
        write = torch.cat([s.slots[s.position:s.position + s.count] for s in seqs])

        def attention(q, keys, values):
            out = torch.zeros_like(q)
            for s in seqs:
                out[s.start:s.start + s.count] = attend(q[s.start:s.start + s.count], keys, values,
                                                        s.slots[:s.position + s.count], s.prefill)
            return out

        if all_logits:
            return self.lm_head(self.layers_forward(tokens, positions, write, cache, attention))[:n]
        last = torch.tensor([s.start + s.count - 1 for s in seqs if s.logits], dtype=torch.long, device=tokens.device)
        if last.numel() < MIN_ROWS:
            last = torch.cat([last, last.new_zeros(MIN_ROWS - last.numel())])
        wanted = sum(s.logits for s in seqs)
        return self.lm_head(self.layers_forward(tokens, positions, write, cache, attention)[last])[:wanted]


def attend(q, keys, values, slots, prefill):
    """Causal attention of q [count, heads, dim], the last `count` positions of a sequence whose keys
    and values for every position sit at `slots` of the cache (lower-right aligned), grouped-query.

    A prompt position's keys may be reused by a later request (prefix reuse) whose chunks end
    elsewhere, so prompt queries always go through the product kernels of MIN_ROWS or more rows:
    a chunk of fewer is padded with copies of its last query. Decode steps are one query each, always."""
    count, heads, dim = q.shape
    length, kv_heads = slots.shape[0], keys.shape[1]
    if prefill and count < MIN_ROWS:
        q = torch.cat([q, q[-1:].expand(MIN_ROWS - count, -1, -1)])
    rows = q.shape[0]
    groups = heads // kv_heads
    # [kv_heads, rows * groups, dim]: the query heads that share a key head are rows of one product
    q = q.view(rows, kv_heads, groups, dim).permute(1, 0, 2, 3).reshape(kv_heads, rows * groups, dim)
    k, v = keys[slots].transpose(0, 1), values[slots].transpose(0, 1)  # [kv_heads, length, dim]
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(dim ** -0.5)
    if prefill:
        allowed = torch.ones(rows, length, dtype=torch.bool, device=q.device).tril(length - count)
        scores = scores.view(kv_heads, rows, groups, length).masked_fill_(~allowed[None, :, None, :], -float("inf"))
        scores = scores.view(kv_heads, rows * groups, length)
    out = torch.bmm(torch.softmax(scores, dim=-1), v)
    return out.view(kv_heads, rows, groups, dim).permute(1, 0, 2, 3).reshape(rows, heads, dim)[:count]


def read_config(folder):
    from ..weights import read_config as read_checked

    path = Path(folder) / "config.json"
    return Config.from_dict(read_checked(path), str(path))


def load(folder, device="cpu", dtype=torch.float32, gptq=False):
    """A Llama model folder -> Llama. On CUDA a GPTQ folder keeps its 4-bit Linears (ExLlamaV2's kernels,
    gptq_cuda.py); elsewhere they are unpacked to floats."""
    from .gptq import read_tensors, unpacked_state_dict

    config = read_config(folder)
    if gptq and torch.device(device).type == "cuda":
        from . import gptq_cuda

        weights, linears = gptq_cuda.load(folder, device)
        return Llama(config, weights, make_linear=linears, device=device, dtype=dtype)
    weights = unpacked_state_dict(folder) if gptq else read_tensors(folder)
    return Llama(config, weights, device=device, dtype=dtype)
