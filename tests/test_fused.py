"""The fused Triton kernels of the paged path (model/fused.py) against their plain torch twins; without a
GPU they run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1)."""

import pytest
import torch

pytest.importorskip("triton", reason="Triton has Linux wheels only: its kernels are tested on Linux")

from llama_pkg.model.fused import FUSED, TORCH

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


def close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert (got.float() - want.float()).abs().max() <= TOLERANCE[dtype] * max(1.0, want.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,d", [(1, 64), (5, 576), (3, 4096)])
def test_add_rms_norm(dtype, rows, d):
    g = torch.Generator().manual_seed(d)
    x, y = (torch.randn(rows, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    w = (torch.rand(d, generator=g) + 0.5).to(DEVICE, dtype)
    (x1, h1), (x2, h2) = FUSED.add_rms_norm(x, y, w, 1e-5), TORCH.add_rms_norm(x, y, w, 1e-5)
    close(x1, x2, dtype)
    close(h1, h2, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,i", [(1, 128), (4, 1536), (2, 11008)])
def test_silu_mul(dtype, rows, i):
    gate_up = torch.randn(rows, 2 * i, generator=torch.Generator().manual_seed(i)).to(DEVICE, dtype) * 3
    close(FUSED.silu_mul(gate_up), TORCH.silu_mul(gate_up).to(dtype), dtype)  # torch's: float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(2, 2, 32), (9, 3, 64), (32, 32, 128)])
def test_rope_write_rotates_and_writes_only_real_rows(dtype, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(heads)
    rows, written = 6, 4  # two padding rows: rotated queries, no cache write
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE, dtype)
    angles = torch.rand(rows, dim // 2, generator=g) * 100
    cos, sin = torch.cos(angles).to(DEVICE), torch.sin(angles).to(DEVICE)
    write = torch.tensor([7, 3, 12, 0], device=DEVICE)
    caches = [[torch.zeros(16, kv_heads, dim, dtype=dtype, device=DEVICE) for _ in range(2)] for _ in range(2)]
    q1 = FUSED.rope_write(qkv, cos, sin, write[:written], *caches[0], heads, kv_heads)
    q2 = TORCH.rope_write(qkv, *TORCH.rope_tables(cos, sin), write[:written], *caches[1], heads, kv_heads)
    close(q1, q2.to(dtype).contiguous(), dtype)
    for a, b in zip(*caches):
        close(a, b, dtype)
        assert (a[[s for s in range(16) if s not in write.tolist()]] == 0).all()  # nothing else written
