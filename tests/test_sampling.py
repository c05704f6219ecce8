"""Sampling: determinism by seed, greedy, top-k/top-p, penalties, banned stop ids."""

import pytest
import torch

from llama_pkg.backends.base import Sampling
from llama_pkg.backends.sampler import apply_penalties, sample


def draw(logits, s, banned=(), seed=0, n=1):
    g = torch.Generator().manual_seed(seed)
    return [sample(logits.clone(), torch.zeros(len(logits)), s, banned, g) for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    assert draw(logits, Sampling(temperature=0, repetition_penalty=1.0), n=5) == [int(logits.argmax())] * 5


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.zeros(1000)
    s = Sampling(temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    assert draw(logits, s, seed=7, n=20) == draw(logits, s, seed=7, n=20)
    assert draw(logits, s, seed=7, n=20) != draw(logits, s, seed=8, n=20)


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    assert set(draw(logits, Sampling(temperature=5.0, top_k=2, top_p=1.0, repetition_penalty=1.0), n=300)) == {0, 1}
    probs = torch.softmax(logits, 0)  # 0.66, 0.24, 0.09, ...
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert set(draw(logits, Sampling(temperature=1.0, top_p=0.7, repetition_penalty=1.0), n=300)) == {0, 1}
    assert set(draw(logits, Sampling(temperature=1.0, top_p=0.5, repetition_penalty=1.0), n=50)) == {0}


def test_banned_ids_are_never_sampled():
    logits = torch.tensor([10.0, 0.0, 0.0])
    assert 0 not in draw(logits, Sampling(temperature=1.0, repetition_penalty=1.0), banned={0}, n=100)
    assert draw(logits, Sampling(temperature=0, repetition_penalty=1.0), banned={0}) != [0]


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0])
    counts = torch.tensor([1.0, 1.0, 3.0, 0.0])
    out = apply_penalties(logits, counts, Sampling(repetition_penalty=2.0))
    assert out.tolist() == pytest.approx([1.0, -4.0, 0.5, 1.0])
    out = apply_penalties(logits, counts, Sampling(repetition_penalty=1.0, presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == pytest.approx([2.0 - 0.75, -2.0 - 0.75, 1.0 - 0.5 - 0.75, 1.0])


@pytest.mark.parametrize("s", [Sampling(temperature=1e-40, repetition_penalty=1.0),
                               Sampling(temperature=5e-324, repetition_penalty=1.0),
                               Sampling(temperature=1e-308, repetition_penalty=1.0),
                               Sampling(top_p=1e-300, repetition_penalty=1.0)])
def test_tiny_temperature_or_top_p_inside_the_bounds_is_greedy_not_nan(s):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 4
    assert draw(logits, s, n=5) == [int(logits.argmax())] * 5
