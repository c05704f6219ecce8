"""Sampling in torch, for the transformers backend: penalties, temperature, top-k, top-p."""

import torch


def apply_penalties(logits, counts, s):
    """Penalties over every token in the context (prompt and answer so far), as ExLlamaV2 applies them."""
    if s.repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = torch.where(counts > 0, penalized, logits)
    if s.presence_penalty or s.frequency_penalty:
        logits = logits - s.presence_penalty * (counts > 0) - s.frequency_penalty * counts
    return logits


def sample(logits, counts, s, banned, generator):
    """One token id from last-position logits (1-D, float32); counts: occurrences of each id in the context."""
    logits = apply_penalties(logits.float(), counts, s)
    if banned:
        logits[list(banned)] = -float("inf")
    temperature = torch.tensor(s.temperature, dtype=logits.dtype)  # 5e-324 is 0 in float32: greedy
    if temperature == 0:
        return int(torch.argmax(logits))
    # shifted by the maximum first: a temperature too small to divide by leaves the top token at 0 and
    # the rest at -inf (greedy in effect), never inf - inf = NaN
    logits = (logits - logits.max()) / temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= s.top_p
        drop[0] = False  # the top token stays, whatever top_p (1e-300 is a valid one)
        logits[order[drop]] = -float("inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
