"""causal_sdpa (the SDPA path for ExLlamaV2, see backends/exllamav2.py) against attention written out."""

import math

import pytest
import torch

from llama_pkg.backends.exllamav2 import causal_sdpa


def reference(q, k, v, scaling):
    """Loop form: query i of the chunk sits at position k_len - q_len + i and sees keys 0..that position."""
    batch, q_len, heads, dim = q.shape
    k_len, groups = k.shape[1], heads // k.shape[2]
    out = torch.zeros(batch, q_len, heads, dim)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                last = k_len - q_len + i
                scores = torch.stack([q[b, i, h] @ k[b, j, h // groups] for j in range(last + 1)]) * scaling
                weights = torch.softmax(scores, 0)
                out[b, i, h] = sum(weights[j] * v[b, j, h // groups] for j in range(last + 1))
    return out.reshape(batch, q_len, heads * dim)


@pytest.mark.parametrize("q_len,k_len,heads,kv_heads", [(5, 5, 4, 4), (3, 8, 4, 2), (6, 6, 6, 2), (1, 7, 2, 1)])
def test_matches_written_out_causal_attention(q_len, k_len, heads, kv_heads):
    g = torch.Generator().manual_seed(q_len * 100 + k_len)
    q = torch.randn(2, q_len, heads, 8, generator=g)
    k = torch.randn(2, k_len, kv_heads, 8, generator=g)
    v = torch.randn(2, k_len, kv_heads, 8, generator=g)
    got = causal_sdpa(q, k, v, 1 / math.sqrt(8))
    assert got.shape == (2, q_len, heads * 8)
    assert torch.allclose(got, reference(q, k, v, 1 / math.sqrt(8)), atol=1e-5)


def test_first_query_does_not_see_the_future():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    changed = v.clone()
    changed[:, 1:] += 10.0  # only future values change
    assert torch.allclose(causal_sdpa(q, k, v, 0.3)[:, 0], causal_sdpa(q, k, changed, 0.3)[:, 0])
