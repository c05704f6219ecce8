"""Sampling a batch of rows at once on the logits' device, each row with its own request's settings.

Per row, in order: repetition, presence and frequency penalties over every token of the context
(prompt and answer, as ExLlamaV2 applies them); stop ids held off until min_new_tokens; temperature 0
is greedy; top_k (0 is off); top_p (the top token always stays); one draw.

A row's token depends only on its own logits, settings, seed and step: every operation is per row,
and the random number is counter-based, a hash of (seed, step), not a generator state shared by the
batch. A temperature too small to divide by is greedy in effect (logits are shifted by their maximum
before the division, so nothing overflows to NaN); a top_p below the top token's probability keeps it.
"""

from dataclasses import dataclass, fields

import torch

MASK32 = 0xFFFFFFFF


def _mul32(a, c):
    """(a * c) mod 2**32 for int64 tensors a < 2**32 and a constant c < 2**32, with no int64 overflow."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def _mix32(h):
    """MurmurHash3's 32-bit finalizer."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform(seeds, steps):
    """One number in [0, 1) per row from int64 tensors (seed < 2**32, step): the same on any device."""
    h = _mix32(_mix32(seeds & MASK32) ^ _mul32((steps + 1) & MASK32, 0x9E3779B9))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


@dataclass
class Settings:
    """Per-row sampling settings as tensors on the device, one entry per batch row."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    min_new_tokens: torch.Tensor
    seed: torch.Tensor

    @classmethod
    def of(cls, samplings, device):
        """From backends.base.Sampling objects, one per row."""
        values = {}
        for f in fields(cls):
            kind = torch.int64 if f.name in ("top_k", "min_new_tokens", "seed") else torch.float32
            values[f.name] = torch.tensor([getattr(s, f.name) for s in samplings], dtype=kind, device=device)
        return cls(**values)

    def write(self, row, sampling):
        """Row `row` takes a request's settings (a backends.base.Sampling)."""
        for f in fields(self):
            getattr(self, f.name)[row] = getattr(sampling, f.name)

    def rows(self, index):
        return Settings(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def sample(logits, counts, s, steps, stop_masks):
    """logits [B, V]; counts [B, V] occurrences of each id in the row's context; s: Settings of the rows;
    steps [B] tokens generated so far; stop_masks [B, V] bool, each row's stop ids. -> chosen ids [B]."""
    logits = logits.float()
    seen = counts > 0
    rp = s.repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    logits = logits - s.presence_penalty[:, None] * seen - s.frequency_penalty[:, None] * counts
    logits = logits.masked_fill((steps < s.min_new_tokens)[:, None] & stop_masks, -float("inf"))
    greedy = logits.argmax(dim=-1)

    temperature = torch.where(s.temperature > 0, s.temperature, torch.ones_like(s.temperature))[:, None]
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    ordered, order = scaled.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(ordered.shape[-1], device=logits.device)[None, :]
    top_k = torch.where(s.top_k > 0, s.top_k, torch.full_like(s.top_k, ordered.shape[-1]))[:, None]
    ordered = ordered.masked_fill(rank >= top_k, -float("inf"))
    probs = torch.softmax(ordered, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs) >= s.top_p[:, None]
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    cumulative = torch.cumsum(probs, dim=-1)
    threshold = uniform(s.seed, steps)[:, None] * cumulative[:, -1:]
    pick = (cumulative <= threshold).sum(dim=-1, keepdim=True).clamp(max=ordered.shape[-1] - 1)
    drawn = order.gather(1, pick)[:, 0]
    return torch.where(s.temperature > 0, drawn, greedy)


def draw(logits, rows, steps, counts, stop_masks, settings):
    """sample() for the batch rows `rows` of the per-row state (counts, stop masks, settings), then count
    the chosen ids into their rows. No host synchronisation: it runs inside the CUDA graphs too."""
    chosen = sample(logits, counts[rows], settings.rows(rows), steps, stop_masks[rows])
    counts.view(-1).index_add_(0, rows * counts.shape[1] + chosen, torch.ones_like(chosen, dtype=counts.dtype))
    return chosen
