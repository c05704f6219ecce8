"""The one sampler (model/sampler.py), one row at a time: determinism by seed, greedy, top-k/top-p,
penalties, stop ids held off until min_new_tokens."""

import pytest
import torch

from llama_pkg.model.sampler import packed, penalize, sample, unpack
from llama_pkg.params import SamplingParams


def draw(logits, s, banned=(), seed=0, n=1):
    """n draws from the same logits at steps 0..n-1 (a row's random number is keyed by seed and step)."""
    s = SamplingParams(**{**s.__dict__, "seed": seed, "min_new_tokens": n if banned else 0})
    stops = torch.zeros(n, len(logits), dtype=torch.bool)
    stops[:, list(banned)] = True
    ids = sample(logits.expand(n, -1), torch.zeros(n, len(logits)), unpack(packed([s] * n)), torch.arange(n), stops)
    return ids.tolist()


def test_greedy_is_argmax():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    assert draw(logits, SamplingParams(temperature=0, repetition_penalty=1.0), n=5) == [int(logits.argmax())] * 5


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.zeros(1000)
    s = SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    assert draw(logits, s, seed=7, n=20) == draw(logits, s, seed=7, n=20)
    assert draw(logits, s, seed=7, n=20) != draw(logits, s, seed=8, n=20)
    assert len(set(draw(logits, s, seed=7, n=20))) > 10  # each step draws anew


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    assert set(draw(logits, SamplingParams(temperature=5.0, top_k=2, top_p=1.0, repetition_penalty=1.0), n=300)) == {0, 1}
    probs = torch.softmax(logits, 0)  # 0.66, 0.24, 0.09, ...
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert set(draw(logits, SamplingParams(temperature=1.0, top_p=0.7, repetition_penalty=1.0), n=300)) == {0, 1}
    assert set(draw(logits, SamplingParams(temperature=1.0, top_p=0.5, repetition_penalty=1.0), n=50)) == {0}


def test_banned_ids_are_never_sampled():
    logits = torch.tensor([10.0, 0.0, 0.0])
    assert 0 not in draw(logits, SamplingParams(temperature=1.0, repetition_penalty=1.0), banned={0}, n=100)
    assert draw(logits, SamplingParams(temperature=0, repetition_penalty=1.0), banned={0}) != [0]


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    counts = torch.tensor([[1.0, 1.0, 3.0, 0.0]])
    out = penalize(logits, counts, unpack(packed([SamplingParams(repetition_penalty=2.0)])))
    assert out[0].tolist() == pytest.approx([1.0, -4.0, 0.5, 1.0])
    s = SamplingParams(repetition_penalty=1.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = penalize(logits, counts, unpack(packed([s])))
    assert out[0].tolist() == pytest.approx([2.0 - 0.75, -2.0 - 0.75, 1.0 - 0.5 - 0.75, 1.0])


def test_the_cpus_sparse_penalties_equal_the_dense_form_bit_for_bit():
    """penalize on the CPU computes only the seen ids: every value, zeros and signs included, as the dense
    form (the CUDA path's) gives it, for penalties of either sign and counts above 1."""
    g = torch.Generator().manual_seed(5)
    n, vocab = 6, 3000
    logits = torch.randn(n, vocab, generator=g) * 4
    logits[:, :40] = 0.0
    counts = ((torch.rand(n, vocab, generator=g) < 0.05) * torch.randint(1, 5, (n, vocab), generator=g)).float()
    s = unpack(packed([SamplingParams(repetition_penalty=rp, presence_penalty=pp, frequency_penalty=fp)
                       for rp, pp, fp in [(1.15, 0, 0), (1.0, 0.5, 0.25), (0.8, -0.5, -1.0), (2.0, 1.5, 0.3),
                                          (1.0, 0, 0), (1.3, -2.0, 2.0)]]))
    seen = counts > 0
    rp = s.repetition_penalty[:, None]
    dense = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    dense = dense - s.presence_penalty[:, None] * seen - s.frequency_penalty[:, None] * counts
    assert torch.equal(penalize(logits, counts, s).view(torch.int32), dense.view(torch.int32))


@pytest.mark.parametrize("s", [SamplingParams(temperature=1e-40, repetition_penalty=1.0),
                               SamplingParams(temperature=5e-324, repetition_penalty=1.0),
                               SamplingParams(temperature=1e-308, repetition_penalty=1.0),
                               SamplingParams(top_p=1e-300, repetition_penalty=1.0)])
def test_tiny_temperature_or_top_p_inside_the_bounds_is_greedy_not_nan(s):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 4
    assert draw(logits, s, n=5) == [int(logits.argmax())] * 5


def test_settings_survive_packing_exactly():
    """Every field comes back from the packed tensor as the value the sampler computes with (float32 of
    the input; integers, seeds up to 2**32 - 1, exact)."""
    s = SamplingParams(temperature=0.7, top_p=0.95, top_k=31999, repetition_penalty=1.15, presence_penalty=-1.9,
                       frequency_penalty=0.3, min_new_tokens=4096, seed=2**32 - 1)
    u = unpack(packed([s]))
    for name, value in s.__dict__.items():
        want = torch.tensor([value], dtype=torch.int64 if isinstance(value, int) else torch.float32)
        assert torch.equal(getattr(u, name), want), name


def full_sort_sample(logits, s, steps):
    """The sampler as it was before the prefilter: a full stable sort of every row (the reference)."""
    from llama_pkg.model.sampler import uniform

    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / torch.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(ordered.shape[-1])[None, :]
    top_k = torch.where(s.top_k > 0, s.top_k, torch.full_like(s.top_k, ordered.shape[-1]))[:, None]
    probs = torch.softmax(ordered.masked_fill(rank >= top_k, -float("inf")), dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs) >= s.top_p[:, None]
    drop[:, 0] = False
    cumulative = torch.cumsum(probs.masked_fill(drop, 0.0), dim=-1)
    threshold = uniform(s.seed, steps)[:, None] * cumulative[:, -1:]
    pick = (cumulative <= threshold).sum(dim=-1, keepdim=True).clamp(max=ordered.shape[-1] - 1)
    return order.gather(1, pick)[:, 0]


@pytest.mark.parametrize("spread", [0.5, 3.0, 12.0])  # flat to peaked rows
def test_the_prefilter_draws_what_a_full_sort_draws(spread, monkeypatch):
    """Every setting the draw takes, over 32,000-id rows from flat to peaked: the same id as the full sort
    of the row, whether the row's 64 most likely ids decided it or the full sort ran."""
    import llama_pkg.model.sampler as sampler

    g = torch.Generator().manual_seed(int(spread * 10))
    settings = [SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=1.0, seed=i)
                for i, (t, k, p) in enumerate((t, k, p) for t in (0.7, 1.0, 5.0) for k in (0, 1, 5, 64, 65, 500)
                                              for p in (0.3, 0.9, 0.95, 1.0))]
    sorts = []
    real = sampler._sorted_prefix
    monkeypatch.setattr(sampler, "_sorted_prefix", lambda probs, k: sorts.append(k) or real(probs, k))
    vocab, n = 32000, len(settings)
    for step in range(4):
        logits = torch.randn(n, vocab, generator=g) * spread
        s = unpack(packed(settings))
        steps = torch.full((n,), step)
        got = sample(logits, torch.zeros(n, vocab), s, steps, torch.zeros(n, vocab, dtype=torch.bool))
        assert got.tolist() == full_sort_sample(logits, s, steps).tolist()
    if spread == 12.0:  # peaked rows at the usual settings: every draw decided by the prefilter, no full sort
        sorts.clear()
        usual = [SamplingParams(temperature=t, top_p=p, seed=i) for i, (t, p) in enumerate([(0.7, 0.95), (1.0, 0.9)])]
        sample(logits[:2], torch.zeros(2, vocab), unpack(packed(usual)), torch.zeros(2, dtype=torch.long),
               torch.zeros(2, vocab).bool())
        assert sorts == [64]


def test_ties_across_the_prefilters_edge_draw_what_a_full_sort_draws(monkeypatch):
    """Logits on a coarse grid (bf16 logits have 8 bits): hundreds of ids share each value, across the 64th
    place too, where which of them a top-k holds is not the stable sort's choice. Rows the prefilter leaves
    undecided go through the CPU's second look (`_row_prefix`). Every draw: the sampler's own with every row
    sorted whole (its CUDA path's result)."""
    import llama_pkg.model.sampler as sampler

    g = torch.Generator().manual_seed(9)
    settings = [SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=1.0, seed=i)
                for i, (t, k, p) in enumerate((t, k, p) for t in (0.5, 1.0) for k in (0, 64, 70) for p in (0.5, 0.9, 1.0))]
    looked = []
    real = sampler._row_prefix
    monkeypatch.setattr(sampler, "_row_prefix", lambda p, floor: looked.append(real(p, floor)) or looked[-1])
    vocab, n = 32000, len(settings)
    s = unpack(packed(settings))
    for step in range(40):
        logits = (torch.randn(n, vocab, generator=g) * 2).round() / 2 + 2.0 * (torch.arange(vocab) < 40)
        steps = torch.full((n,), step)
        args = (logits, torch.zeros(n, vocab), s, steps, torch.zeros(n, vocab, dtype=torch.bool))
        got = sample(*args)
        with monkeypatch.context() as whole:
            whole.setattr(sampler, "PREFILTER", vocab)
            assert got.tolist() == sample(*args).tolist(), step
    assert any(prefix is not None for prefix in looked)


def test_a_row_draws_alike_alone_and_in_a_batch():
    """Rows whose draw the prefilter decides beside rows that need the full sort, and each alone."""
    g = torch.Generator().manual_seed(3)
    settings = [SamplingParams(temperature=t, top_p=p, seed=i) for i, (t, p) in
                enumerate([(0.7, 0.95), (5.0, 1.0), (1.0, 0.9), (5.0, 0.95), (0.0, 1.0)])]
    logits = torch.randn(len(settings), 49152, generator=g) * torch.tensor([[8.0], [1.0], [4.0], [1.0], [2.0]])
    n, vocab = logits.shape
    counts, stops = torch.zeros(n, vocab), torch.zeros(n, vocab, dtype=torch.bool)
    together = sample(logits, counts, unpack(packed(settings)), torch.arange(n), stops)
    for i in range(n):
        alone = sample(logits[i:i + 1], counts[i:i + 1], unpack(packed(settings[i:i + 1])), torch.arange(n)[i:i + 1],
                       stops[i:i + 1])
        assert alone.tolist() == together[i:i + 1].tolist()


def test_top_p_zero_keeps_the_most_likely_token_alone():
    """top_p 0 (the schema's minimum) is the nucleus of the top token: every draw is it, at any temperature."""
    logits = torch.tensor([2.0, 1.9, 1.8, 0.0])
    assert set(draw(logits, SamplingParams(temperature=5.0, top_p=0.0, repetition_penalty=1.0), n=100)) == {0}
