"""The CUDA engine step's code on the CPU: the Triton paged decode kernel (in Triton's interpreter), the
SDPA prefill over the paged cache, graph-bucket bookkeeping, and the whole paged step (the model runner
with `paged`: decode buckets run without capture) against transformers. On a GPU machine the same
tests run the kernel for real."""

import pytest
import torch

pytest.importorskip("triton", reason="Triton has Linux wheels only: its kernels are tested on Linux")

from conftest import reference_engine
from engine_probe import teacher_forced_logits
from llama_pkg import cdiv
from llama_pkg.backends.hf import TransformersBackend
from llama_pkg.engine.cuda_graphs import bucket_for, buckets_up_to
from llama_pkg.model.attention import (attend, decode_attention, decode_attention_reference, prefill_attention,
                                       splits_for)
from llama_pkg.params import SamplingParams

# Without a GPU, conftest.py has set TRITON_INTERPRET=1: the kernel runs in Triton's interpreter.

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def paged_case(heads, kv_heads, dim, lengths, block_size=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(1, cdiv(max(lengths), block_size))
    blocks = width * len(lengths) + 3
    keys = torch.randn(blocks * block_size, kv_heads, dim, generator=g).to(DEVICE, dtype)
    values = torch.randn(blocks * block_size, kv_heads, dim, generator=g).to(DEVICE, dtype)
    # every sequence gets its own blocks, scattered over the pool in a random order
    order = torch.randperm(blocks, generator=g)[:width * len(lengths)].view(len(lengths), width)
    tables = order.to(DEVICE, torch.int32)
    q = torch.randn(len(lengths), heads, dim, generator=g).to(DEVICE, dtype)
    return q, keys, values, tables, torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("heads,kv_heads,dim", [(2, 2, 32), (9, 3, 64), (8, 1, 16), (4, 2, 128)])
@pytest.mark.parametrize("splits", [1, 3, 16])
def test_decode_kernel_matches_torch_reference(heads, kv_heads, dim, splits):
    q, keys, values, tables, lengths = paged_case(heads, kv_heads, dim, [1, 17, 130, 0, 64, 33])
    got = decode_attention(q, keys, values, tables, lengths, 16, splits)
    want = decode_attention_reference(q, keys, values, tables, lengths, 16)
    assert (got - want).abs().max() < 1e-5
    assert (got[3] == 0).all()  # a padding row (length 0) attends to nothing


def test_decode_kernel_in_fp16_and_against_model_attend():
    q, keys, values, tables, lengths = paged_case(4, 2, 64, [5, 40, 100], dtype=torch.float16)
    got = decode_attention(q, keys, values, tables, lengths, 16, 2).float()
    for b, n in enumerate(lengths.tolist()):
        pos = torch.arange(n, device=DEVICE)
        slots = tables[b, pos // 16].long() * 16 + pos % 16
        want = attend(q[b:b + 1].float(), keys.float(), values.float(), slots, n, False, 16)[0]
        assert (got[b] - want).abs().max() < 2e-3


@pytest.mark.parametrize("count,length", [(1, 1), (5, 5), (7, 40), (32, 32)])
def test_prefill_attention_continues_a_cached_prefix(count, length):
    q, keys, values, tables, _ = paged_case(6, 2, 32, [length])
    q = torch.randn(count, 6, 32, device=DEVICE)
    pos = torch.arange(-(-length // 16) * 16, device=DEVICE)  # to the end of the last block: attend's tiles
    slots = tables[0, pos // 16].long() * 16 + pos % 16
    got = prefill_attention(q, keys, values, slots[:length])
    want = attend(q, keys, values, slots, length, True, 16)
    assert got.shape == (count, 6, 32)
    assert (got - want).abs().max() < 1e-5


def test_buckets_and_splits():
    assert buckets_up_to(128) == [1, 2, 4, 8, 16, 32, 48, 64, 96, 128]
    assert buckets_up_to(8) == [1, 2, 4, 8] and buckets_up_to(1) == [1] and buckets_up_to(6) == [1, 2, 4, 6]
    buckets = buckets_up_to(100)
    assert buckets[-1] == 100 and all(b < 100 for b in buckets[:-1])
    assert [bucket_for(n, buckets) for n in (1, 3, 16, 17, 65, 100, 101)] == [1, 4, 16, 32, 96, 100, None]
    assert splits_for(1, 32, 132) == 8 and splits_for(64, 32, 132) == 1 and splits_for(1, 1, 132) == 16


# The whole step on the CPU; on a GPU machine tests/test_gpu.py runs it on CUDA, graphs included.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run of the CUDA step (test_gpu.py on a GPU)")


@pytest.fixture(scope="module")
def paged_engine(test_model, monkeypatch_module):
    monkeypatch_module.setenv("LLAMA_PKG_MAX_BATCH", "6")
    monkeypatch_module.setenv("LLAMA_PKG_PREFILL_CHUNK", "32")
    return TransformersBackend(test_model, 4096), reference_engine(test_model, 4096, paged=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


def teacher_forced(reference, prompt, after):
    """transformers' logits at the prompt's last position and after each of `after`."""
    return reference.logits(prompt + after)[len(prompt) - 1:]


@cpu_only
def test_paged_step_matches_transformers_ragged_batch(paged_engine):
    """Three requests of different prompt lengths (one spanning two prefill chunks) decode side by side
    in one padded bucket; every step's logits match transformers' for the same tokens."""
    reference, engine = paged_engine
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randint(3, 32000, (n,), generator=g).tolist(), torch.randint(3, 32000, (6,), generator=g).tolist())
             for n in (3, 45, 17)]
    before = engine.stats()
    got = teacher_forced_logits(engine, cases)
    stats = engine.stats()
    assert stats["graph_steps"] > before["graph_steps"] and stats["eager_steps"] > before["eager_steps"]
    for (prompt, after), logits in zip(cases, got):
        want = teacher_forced(reference, prompt, after)
        assert logits.shape == want.shape
        assert (logits - want).abs().max() < 1e-3 * want.abs().max()
    assert engine.call(engine.pool.all_free)


@cpu_only
def test_paged_step_reuses_prefix_blocks_after_a_cancel(paged_engine):
    """A cancelled request's prompt blocks stay cached; a request sharing the prefix reuses them and
    its logits are still right."""
    reference, engine = paged_engine
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 32000, (40,), generator=g).tolist()
    tokens = engine.generate(prompt, 8, SamplingParams(seed=1), frozenset())
    next(tokens), next(tokens)
    tokens.close()
    reused = engine.stats()["prefix_tokens_reused"]
    after = torch.randint(3, 32000, (4,), generator=g).tolist()
    (got,) = teacher_forced_logits(engine, [(prompt[:36] + [7, 8], after)])
    assert engine.stats()["prefix_tokens_reused"] >= reused + 32
    want = teacher_forced(reference, prompt[:36] + [7, 8], after)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
    assert engine.call(engine.pool.all_free)


@cpu_only
def test_paged_step_padding_rows_touch_only_scratch(paged_engine):
    """A bucket's padding rows write into the scratch block and sample on the scratch row: a request's
    token counts stay exactly its context."""
    _, engine = paged_engine
    prompt = [1, 450, 4996, 17354]
    out = list(engine.generate(prompt, 5, SamplingParams(temperature=0, repetition_penalty=1.0), frozenset()))
    assert len(out) == 5
    # the row it ran on was reset at the next admission only; find it by its counts
    runner = engine.runner
    counts = engine.call(lambda: runner.sampler.counts[:runner.scratch_row].clone())
    expected = torch.bincount(torch.tensor(prompt + out), minlength=counts.shape[1]).float()
    assert any(torch.equal(row, expected) for row in counts)
