"""The CPU's Linears on integer kernels: 4-bit groups (w = (q - 8) * scale + zero) on the package's own kernel
(cpu_kernels.py: int8 activations in blocks of 32) or on ATen's `_weight_int4pack_mm_for_cpu`, and int8 per
output channel on ATen's `_weight_int8pack_mm` (both ATen kernels with bf16 activations, their vectorised
path). Each sums an output over K in an order set by K alone, never by the row or thread count: a row's bits
do not depend on its batch (docs/batch-invariance.md), and a weight is read as 1 or 0.5 byte. Float
checkpoints are quantized at load; GPTQ ones are repacked into the 4-bit layout (act-order included), never
unpacked to floats.
Prompt rows may instead go through bf16 matrix products over a dense copy of the same dequantized weights
(`PromptTiles`): the integer kernels are compute-bound at a chunk's rows, a dense product is not, and its rows
keep their bits because each position sits at a fixed row (position % TILE) of a TILE-row product.
"""

import torch
import torch.nn.functional as F

from .gptq import unpack_nibbles

KINDS = ("int4", "int8", "float32")  # LLAMA_PKG_CPU_WEIGHTS: what float checkpoints become on the CPU
GROUP = 32  # input features per 4-bit group when float weights are quantized to int4
TILE = 128  # rows of each dense product of prompt rows
PROMPT_KINDS = ("dense", "integer")  # LLAMA_PKG_CPU_PROMPT: how prompt rows of float checkpoints multiply
BF16 = torch.bfloat16


class PromptTiles:
    """Where a step's prompt rows go in the dense products. Rows before `first` (decode rows) take the integer
    kernel; prompt row `first + j` sits at row index[j] of a zero-padded [tiles * TILE] buffer, at
    position % TILE of a tile of its own sequence, so its product has the same shape and the same row
    whatever its chunk, its neighbours or the cached prefix before it."""

    def __init__(self, first, spans):
        """spans: (start position, count) of each sequence's prompt rows, in row order, from row `first`."""
        index, tiles = [], 0
        for start, count in spans:
            base = tiles - start // TILE
            index += [(base + p // TILE) * TILE + p % TILE for p in range(start, start + count)]
            tiles += (start + count - 1) // TILE - start // TILE + 1
        self.first, self.tiles, self.index = first, tiles, torch.tensor(index)


class _Linear:
    """The shared call: integer kernel rows, and prompt rows through `dense` (bf16 [N, K]) when both are given.
    Takes any float dtype, returns out_dtype (what the kernel writes): the next operation reads it as it is."""

    dense = None
    out_dtype = BF16

    def __call__(self, x, tiles=None):
        if tiles is None or self.dense is None:
            return self.kernel(x)
        out = x.new_empty(x.shape[0], self.dense.shape[0], dtype=self.out_dtype)
        if tiles.first:
            out[:tiles.first] = self.kernel(x[:tiles.first])
        rows = x.new_zeros(tiles.tiles * TILE, x.shape[1], dtype=BF16)
        rows.index_copy_(0, tiles.index, x[tiles.first:].to(BF16))
        products = torch.cat([F.linear(rows[t * TILE:(t + 1) * TILE], self.dense) for t in range(tiles.tiles)])
        out[tiles.first:] = products.index_select(0, tiles.index)
        return out


class Int8Linear(_Linear):
    """y = x @ (q * scale).T, q int8 [N, K], one bf16 scale per output channel; out_dtype: the result's (the
    bf16 ATen's kernel writes, or float32 for logits). kernels: the package's kernel (cpu_kernels.py: int8
    activations in blocks of 32, float32 out) where it takes the shape, else ATen's."""

    def __init__(self, weight, dense=False, out_dtype=BF16, kernels=None):
        from .cpu_kernels import Packed8

        self.out_dtype = out_dtype
        w = weight.float()
        self.scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(BF16)  # rounded first: q fits the scale used
        self.q = torch.round(w / self.scales.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        if dense:
            self.dense = (self.q.float() * self.scales.float()[:, None]).to(BF16)
        self.kernels = kernels if kernels is not None and Packed8.fits(*self.q.shape) else None
        if self.kernels is not None:
            self.packed, self.out_dtype = Packed8(self.q, self.scales), torch.float32
            del self.q  # the packed copy is the one read

    def kernel(self, x):
        if self.kernels is not None:
            return self.kernels.linear(x, self.packed)
        return torch.ops.aten._weight_int8pack_mm(x.to(BF16), self.q, self.scales).to(self.out_dtype)


class Int4Linear(_Linear):
    """y = x[:, perm] @ W.T, W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k // group; q in
    0..15 [N, K]. perm: act-order's input order (None: in order). dense: keep W in bf16 for prompt rows (in
    order only). kernels: the package's kernel (cpu_kernels.py: int8 activations, float32 out) where it takes
    the shape, else ATen's (bf16 activations and out); the weights are repacked for the one that runs."""

    def __init__(self, q, scales, zeros, group, perm=None, dense=False, kernels=None):
        from .cpu_kernels import Packed

        self.group, self.perm = group, perm
        self.kernels = kernels if kernels is not None and Packed.fits(*q.shape, group, scales, zeros) else None
        if self.kernels is not None:
            self.packed, self.out_dtype = Packed(q, scales, zeros, group, perm), torch.float32
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
            self.scales_zeros = torch.stack([scales.float(), zeros.float()], dim=-1).to(BF16).contiguous()
        if dense and perm is None:
            sz = torch.stack([scales.float(), zeros.float()], dim=-1).to(BF16).float().repeat_interleave(group, dim=0)
            self.dense = ((q.float() - 8) * sz[..., 0].t() + sz[..., 1].t()).to(BF16)  # [N, K]

    def kernel(self, x):
        if self.kernels is not None:  # act-order's perm applied in the kernel, as it quantizes x
            return self.kernels.linear(x, self.packed)
        x = x.to(BF16)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_zeros)


class Concat:
    """Linears that read one input and cannot share one product (act-order with other input orders)."""

    def __init__(self, parts):
        self.parts = parts

    def __call__(self, x, tiles=None):
        return torch.cat([p(x, tiles) for p in self.parts], dim=-1)


def quantize_int4(weight, group=GROUP):
    """float [N, K] -> (q [N, K] in 0..15, scales [K/group, N], zeros [K/group, N]): asymmetric per group."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low).clamp(min=1e-12) / 15).to(BF16).float()
    q = torch.round((w - low[..., None]) / scales[..., None]).clamp(0, 15)
    zeros = low + 8 * scales  # (q - 8) * scale + zero = q * scale + low
    return q.reshape(n, k).to(torch.int32), scales.t().contiguous(), zeros.t().contiguous()


def gptq_parts(tensors, prefix):
    """A GPTQ v1 Linear -> (q [N, K], scales [G, N], zeros [G, N], group, perm) in the kernel's terms.
    GPTQ's W[n, k] = s[g, n] * (q[k, n] - (z[g, n] + 1)), g = g_idx[k]: zero = s * (7 - z). Act-order
    (g_idx not ascending): K is reordered so each group's inputs are contiguous, and perm reorders x."""
    q = unpack_nibbles(tensors[prefix + ".qweight"], dim=0)  # [K, N]
    z = unpack_nibbles(tensors[prefix + ".qzeros"], dim=1)  # [G, N]
    s = tensors[prefix + ".scales"].float()
    g_idx = tensors[prefix + ".g_idx"].long()
    groups, k = s.shape[0], q.shape[0]
    if k % groups or torch.bincount(g_idx, minlength=groups).ne(k // groups).any():
        raise ValueError(f"{prefix}: GPTQ groups of unequal size (g_idx), which the 4-bit CPU kernel cannot take")
    perm = None
    if not torch.equal(g_idx, torch.arange(k) // (k // groups)):
        perm = torch.argsort(g_idx, stable=True)
        q = q[perm]
    return q.t(), s, s * (7 - z).float(), k // groups, perm


class CpuLinears:
    """make_linear for the CPU engine: the prefixes of Linears that read one input -> one integer Linear.
    GPTQ prefixes (a .qweight) become 4-bit; float ones int8 or 4-bit groups as `kind` says, with a bf16
    copy of the dequantized weights for prompt rows when prompt="dense" (a GPTQ folder keeps only its 4 bits)."""

    def __init__(self, tensors, kind="int4", prompt="dense", kernels=None):
        self.tensors, self.kind, self.dense, self.kernels = tensors, kind, prompt == "dense", kernels

    def __call__(self, prefixes):
        if all(p + ".qweight" in self.tensors for p in prefixes):
            parts, dense = [gptq_parts(self.tensors, p) for p in prefixes], False
        elif self.kind == "int4":
            parts, dense = [(*quantize_int4(self.tensors[p + ".weight"]), GROUP, None) for p in prefixes], self.dense
        else:
            return Int8Linear(torch.cat([self.tensors[p + ".weight"] for p in prefixes]), self.dense,
                              kernels=self.kernels)
        if any(not _same_order(p, parts[0]) for p in parts):
            return Concat([Int4Linear(*p, kernels=self.kernels) for p in parts])
        return Int4Linear(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1),
                          torch.cat([p[2] for p in parts], dim=1), parts[0][3], parts[0][4], dense, self.kernels)


def _same_order(a, b):
    """Two 4-bit parts whose inputs line up (group and act-order permutation): one product takes both."""
    return a[3] == b[3] and (a[4] is None) == (b[4] is None) and (a[4] is None or torch.equal(a[4], b[4]))


def head(weight, kernels=None):
    """The lm head (float in every checkpoint here): int8 per output channel, whatever the Linears are (4-bit
    groups cost the demo model 2 % of its likelihood of a fixed text: benchmarks/RESULTS.md); float32 logits.
    kernels: the package's (cpu_kernels.py), else ATen's."""
    return Int8Linear(weight, out_dtype=torch.float32, kernels=kernels)


def release_freed_memory():
    """Hand the heap's free pages back to the system after loading (glibc's malloc_trim): the checkpoint's
    tensors, read and repacked one by one, leave holes that would otherwise stay in the RSS."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
        pass

