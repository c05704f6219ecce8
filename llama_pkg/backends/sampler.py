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
    if s.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= s.top_p  # keeps at least the top token
        logits[order[drop]] = -float("inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
