"""The decoder layer's small operations two ways: TORCH (plain torch, the CPU path and the reference) and
FUSED (one Triton kernel each, for the paged path: CUDA, and the CPU tests in Triton's interpreter):
residual add + RMSNorm, SiLU(gate) * up, and RoPE in fp32 with the paged K/V cache write. On CUDA each
torch version is several launches per layer; the Triton one is one.
"""

import torch
import torch.nn.functional as F

from .. import cdiv


class TorchOps:
    """In as few torch operations as their results allow (on the CPU each costs microseconds whatever its size):
    the Linears' outputs are read in their own dtype (bf16 from the integer kernels), a normed input is cast
    to it once, and RoPE rotates in float32 with one table pair per step (`rope_tables`)."""

    @staticmethod
    def add_rms_norm(x, y, weight, eps):
        """(x + y, rms_norm(x + y) * weight): the residual stream (x's dtype) and the next sublayer's input, in
        y's (the dtype the Linears write and take)."""
        x = x + y
        return x, F.rms_norm(x, weight.shape, weight, eps).to(y.dtype)

    @staticmethod
    def silu_mul(gate_up):
        """silu(gate) * up of gate_up's two halves, float32: its bf16 inputs rounded once, by the product that
        reads it."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate.float()).mul_(up)

    @staticmethod
    def rope_tables(cos, sin):
        """cos, sin [rows, dim / 2] -> what rope_write takes: [rows, 1, dim] each, (cos, cos) and (-sin, sin), so
        that x * cos + roll(x, dim / 2) * sin is the half-split rotation (the same bits as its two halves)."""
        return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([-sin, sin], dim=-1)[:, None]

    @staticmethod
    def rope_write(qkv, cos, sin, write, keys, values, heads, kv_heads):
        """qkv [rows, (heads + 2 kv_heads) * dim]; cos, sin from rope_tables (float32). Rotates queries and keys
        (half-split pairs, the Hugging Face layout) in float32, writes the first len(write) rows' keys and
        values at cache slots `write` in the cache's dtype (rows beyond are padding). -> queries [rows, heads,
        dim], float32."""
        dim = keys.shape[-1]
        qkv = qkv.view(qkv.shape[0], heads + 2 * kv_heads, dim)
        qk = qkv[:, :heads + kv_heads].float()
        rotated = qk.roll(dim // 2, dims=-1).mul_(sin)
        qk.mul_(cos).add_(rotated)
        n = write.shape[0]
        keys.index_copy_(0, write, qk[:n, heads:].to(keys.dtype))
        values.index_copy_(0, write, qkv[:n, heads + kv_heads:].to(values.dtype))
        return qk[:, :heads]


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_kernel(x_ptr, y_ptr, w_ptr, x_out_ptr, h_ptr, eps, D: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        d = tl.arange(0, BLOCK)
        keep = d < D
        x = tl.load(x_ptr + row * D + d, mask=keep, other=0.0).to(tl.float32)
        x += tl.load(y_ptr + row * D + d, mask=keep, other=0.0).to(tl.float32)
        x = x.to(x_out_ptr.dtype.element_ty)  # the residual stream keeps the model's dtype, as in torch
        tl.store(x_out_ptr + row * D + d, x, mask=keep)
        xf = x.to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
        w = tl.load(w_ptr + d, mask=keep, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * D + d, (xf * scale * w).to(h_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def silu_mul_kernel(gu_ptr, out_ptr, I: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = i < I
        gate = tl.load(gu_ptr + row * 2 * I + i, mask=keep, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * 2 * I + I + i, mask=keep, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * I + i, (gate / (1.0 + tl.exp(-gate)) * up).to(out_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, write_ptr, k_ptr, v_ptr, q_ptr, n_write,
                          HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)  # queries, then keys, then values
        half = tl.arange(0, DIM // 2)
        src = qkv_ptr + (row * (HEADS + 2 * KV_HEADS) + head) * DIM
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + DIM // 2 + half).to(tl.float32)
        if head < HEADS + KV_HEADS:
            cos = tl.load(cos_ptr + row * (DIM // 2) + half)
            sin = tl.load(sin_ptr + row * (DIM // 2) + half)
            r1 = x1 * cos - x2 * sin
            r2 = x2 * cos + x1 * sin
            x1 = r1
            x2 = r2
        if head < HEADS:
            dst = q_ptr + (row * HEADS + head) * DIM
            tl.store(dst + half, x1.to(q_ptr.dtype.element_ty))
            tl.store(dst + DIM // 2 + half, x2.to(q_ptr.dtype.element_ty))
        elif row < n_write:
            slot = tl.load(write_ptr + row)
            if head < HEADS + KV_HEADS:
                dst = k_ptr + (slot * KV_HEADS + head - HEADS) * DIM
            else:
                dst = v_ptr + (slot * KV_HEADS + head - HEADS - KV_HEADS) * DIM
            tl.store(dst + half, x1.to(k_ptr.dtype.element_ty))
            tl.store(dst + DIM // 2 + half, x2.to(k_ptr.dtype.element_ty))

    return add_rms_norm_kernel, silu_mul_kernel, rope_write_kernel


ADD_RMS_NORM_KERNEL = SILU_MUL_KERNEL = ROPE_WRITE_KERNEL = None


def _ensure():
    """Make the kernels on first use (importing triton then, never at the package's import)."""
    global ADD_RMS_NORM_KERNEL, SILU_MUL_KERNEL, ROPE_WRITE_KERNEL
    if ADD_RMS_NORM_KERNEL is None:
        ADD_RMS_NORM_KERNEL, SILU_MUL_KERNEL, ROPE_WRITE_KERNEL = _kernels()
    import triton

    return triton


class FusedOps:
    @staticmethod
    def rope_tables(cos, sin):
        return cos, sin

    @staticmethod
    def add_rms_norm(x, y, weight, eps):
        triton = _ensure()
        rows, d = x.shape
        x_out, h = torch.empty_like(x), torch.empty_like(x)
        ADD_RMS_NORM_KERNEL[(rows,)](x.contiguous(), y.contiguous(), weight, x_out, h, eps, D=d,
                                     BLOCK=triton.next_power_of_2(d))
        return x_out, h

    @staticmethod
    def silu_mul(gate_up):
        triton = _ensure()
        rows, i = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, i, dtype=gate_up.dtype, device=gate_up.device)
        block = min(1024, triton.next_power_of_2(i))
        SILU_MUL_KERNEL[(rows, cdiv(i, block))](gate_up.contiguous(), out, I=i, BLOCK=block)
        return out

    @staticmethod
    def rope_write(qkv, cos, sin, write, keys, values, heads, kv_heads):
        _ensure()
        rows, dim = qkv.shape[0], keys.shape[-1]
        if dim & (dim - 1) or keys.stride(0) != kv_heads * dim:
            raise ValueError("rope_write needs a power-of-two head dim and a contiguous cache")
        q = torch.empty(rows, heads, dim, dtype=keys.dtype, device=qkv.device)  # what attention reads with the cache
        ROPE_WRITE_KERNEL[(rows, heads + 2 * kv_heads)](
            qkv.contiguous(), cos.contiguous(), sin.contiguous(), write, keys, values, q, write.shape[0],
            HEADS=heads, KV_HEADS=kv_heads, DIM=dim)
        return q


TORCH, FUSED = TorchOps(), FusedOps()
