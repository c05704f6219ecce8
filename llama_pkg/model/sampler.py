"""The one sampler: a batch of rows at once, each with its own request's settings, counts and stop ids.
Per row: repetition/presence/frequency penalties over the whole context (as ExLlamaV2), its grammar mask
(json_schema), stop ids held off until min_new_tokens (unless the mask allows nothing else), temperature
(0: greedy), top_k (0: off), top_p (the top token stays), one draw from a counter-based random number (a
hash of seed and step): a row never depends on the other rows. The draw looks at a row's PREFILTER most
likely ids first, then (on the CPU) at its ids likely enough to hold its nucleus, and sorts the whole row
only where the draw reaches beyond them (a CUDA graph always sorts, and selects per row, so both devices
draw alike).
"""

from dataclasses import astuple, fields
from types import SimpleNamespace

import torch

from ..params import SamplingParams

MASK32 = 0xFFFFFFFF
NAMES = tuple(f.name for f in fields(SamplingParams))
INTEGER = ("top_k", "min_new_tokens", "seed")
PREFILTER = 64  # ids per row a draw looks at first; the full sort only when the draw reaches beyond them
FLOOR = 4096  # on the CPU next the ids of probability at least (1 - top_p) / FLOOR (then / V: enough for sure)


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


def packed(params, device="cpu"):
    """SamplingParams, one per row -> one [rows, fields] float64 tensor (exact for seeds below 2**32)."""
    return torch.tensor([astuple(p) for p in params], dtype=torch.float64, device=device)


def unpack(table):
    """[rows, fields] -> each field's column, in the dtype the sampler computes with."""
    return SimpleNamespace(**{n: table[:, i].to(torch.int64 if n in INTEGER else torch.float32)
                              for i, n in enumerate(NAMES)})


def penalize(logits, counts, s):
    """Repetition, presence and frequency penalties; counts [B, V]: occurrences of each id in the context. On
    the CPU only the seen ids are computed (an unseen id's logit is x - 0 - 0 = x), and in that order, so
    the values are the same; the dense form is several times slower there."""
    if logits.device.type == "cpu":
        rows, ids = (counts > 0).nonzero(as_tuple=True)
        x, c = logits[rows, ids], counts[rows, ids]
        rp = s.repetition_penalty[rows]
        x = torch.where(x > 0, x / rp, x * rp) - s.presence_penalty[rows] - s.frequency_penalty[rows] * c
        return logits.index_put((rows, ids), x)
    seen = counts > 0
    rp = s.repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - s.presence_penalty[:, None] * seen - s.frequency_penalty[:, None] * counts


def allowed_ids(masks, vocab):
    """Token masks [B, words] int32, bit i of word w allowing id 32*w + i -> [B, vocab] bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=masks.device)
    return ((masks[:, :, None] >> shifts) & 1).reshape(masks.shape[0], -1)[:, :vocab].bool()


def sample(logits, counts, s, steps, stop_masks, masks=None):
    """logits [B, V]; counts [B, V]; s: unpacked settings of the rows; steps [B] tokens generated so far;
    stop_masks [B, V] bool, each row's stop ids; masks: None, or [B, words] int32 token masks (all bits
    set for a free row). -> chosen ids [B]. On the CPU, steps skip what changes no row: the penalties where
    every row's are neutral (x / 1, x * 1 and x - 0 are x), the stop ids' hold where no row is below its
    min_new_tokens, the draw where every row is greedy."""
    cpu = logits.device.type == "cpu"
    logits = logits.float()
    if not cpu or bool(((s.repetition_penalty != 1) | (s.presence_penalty != 0) | (s.frequency_penalty != 0)).any()):
        logits = penalize(logits, counts, s)
    if masks is not None:
        logits = logits.masked_fill(~allowed_ids(masks, logits.shape[-1]), -float("inf"))
    if not cpu or bool((steps < s.min_new_tokens).any()):
        held = logits.masked_fill((steps < s.min_new_tokens)[:, None] & stop_masks, -float("inf"))
        # min_new_tokens holds the stop ids off only while the mask allows another id: a complete document ends
        logits = torch.where((held > -float("inf")).any(dim=-1, keepdim=True), held, logits)
    greedy = logits.argmax(dim=-1) if not cpu or bool((s.temperature <= 0).any()) else None
    if cpu and bool((s.temperature <= 0).all()):
        return greedy
    # shifted by the maximum first: a temperature too small to divide by is greedy in effect, never NaN
    temperature = torch.where(s.temperature > 0, s.temperature, torch.ones_like(s.temperature))[:, None]
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    vocab = scaled.shape[-1]
    top_k = torch.where(s.top_k > 0, s.top_k.clamp(max=vocab), torch.full_like(s.top_k, vocab))[:, None]
    probs = torch.softmax(scaled, dim=-1)  # per row (one thread a row): no bit depends on the other rows
    u = uniform(s.seed, steps)[:, None]
    # the PREFILTER most likely ids decide the draw unless the nucleus or the draw reaches beyond them
    top_p = s.top_p[:, None]
    drawn, decided = _draw(*_sorted_prefix(probs, min(PREFILTER, vocab)), top_k, top_p, u, vocab)
    decided = decided | (s.temperature <= 0)
    if not cpu:  # in a CUDA graph (no host branch): every row's full sort, selected per row
        drawn = torch.where(decided, drawn, _draw(*_sorted_prefix(probs, vocab), top_k, top_p, u, vocab)[0])
    else:  # on the CPU the rows left undecided look further, one by one; those still undecided are sorted
        # each row's ids of probability at least (1 - need) / n, need its nucleus' mass (with no cut: its
        # draw's): with n = V the ids below hold less than 1 - need of the mass, so these settle the draw
        # unless a top_k cut reaches beyond them; n = FLOOR first keeps fewer ids and usually settles it too
        need = torch.where(top_p >= 1, u, top_p)[:, 0]
        for r in (~decided).nonzero()[:, 0].tolist():
            for n in (FLOOR, vocab):
                prefix = _row_prefix(probs[r], (1 - float(need[r])) / n)
                if prefix is None:
                    continue
                one, settled = _draw(*prefix, top_k[r:r + 1], top_p[r:r + 1], u[r:r + 1], vocab)
                drawn[r], decided[r] = one[0], settled[0]
                if bool(settled[0]):
                    break
        if not bool(decided.all()):
            rows = (~decided).nonzero()[:, 0]
            drawn = drawn.index_put((rows,), _draw(*_sorted_prefix(probs[rows], vocab), top_k[rows], top_p[rows],
                                                   u[rows], vocab)[0])
    return drawn if greedy is None else torch.where(s.temperature > 0, drawn, greedy)


def _sorted_prefix(probs, k):
    """The k largest probabilities of each row, descending, ties by id (as a stable sort of the row), their ids,
    and whether they are the stable sort's first k (false where equal values straddle position k: which of
    them the prefix holds is then not the sort's choice)."""
    rows, vocab = probs.shape
    if k >= vocab:
        values, ids = probs.sort(dim=-1, descending=True, stable=True)
        return values, ids, torch.ones(rows, dtype=torch.bool, device=probs.device)
    values, ids = probs.topk(k + 1, dim=-1)
    ids, by_id = ids.sort(dim=-1)
    values, order = values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    # ties of probability 0 may straddle it: an id of mass 0 is never drawn
    return values[:, :k], ids.gather(-1, order)[:, :k], (values[:, k - 1] != values[:, k]) | (values[:, k - 1] == 0)


def _row_prefix(p, floor):
    """One row p [V]'s ids of probability at least `floor`, as _sorted_prefix gives them: whatever the floor,
    exactly the stable sort's first ids (every id it leaves out is less likely than every id it holds). None
    when there are none, or more than a quarter of the row (a flat row: sorted whole with the others, in
    one call over the threads)."""
    ids = (p >= floor).nonzero()[:, 0]  # in id order: the stable sort's order among ties
    if not 0 < ids.shape[0] <= p.shape[0] // 4:
        return None
    values, order = p[ids].sort(descending=True, stable=True)
    return values[None], ids[order][None], torch.ones(1, dtype=torch.bool, device=p.device)


def _draw(head, order, whole, top_k, top_p, u, vocab):
    """One draw by inverse CDF over the rows' most likely ids, head [B, k] (descending, their ids `order`;
    whole: they are the sorted row's first k): top_k, then top_p (the top id stays), renormalised. -> (ids [B],
    decided [B]): decided where these k ids settle the draw exactly as over the whole sorted row: top_k within
    them, or the nucleus ending within them (their mass reaches top_p), or, with neither cut, the draw landing
    within them."""
    k = head.shape[-1]
    rank = torch.arange(k, device=head.device)[None, :]
    head = head.masked_fill(rank >= top_k, 0.0)
    # under a top_k cut (within the prefix) the nucleus is of the renormalised top-k probabilities
    cut = top_k < vocab
    head = torch.where(cut, head / head.sum(dim=-1, keepdim=True), head)
    before = torch.cumsum(head, dim=-1) - head
    drop = before >= top_p
    drop[:, 0] = False
    kept = head.masked_fill(drop, 0.0)
    cumulative = torch.cumsum(kept, dim=-1)
    uncut = (top_p >= 1) & ~cut
    total = torch.where(uncut, torch.ones_like(top_p), cumulative[:, -1:])  # no cut: the whole row's mass, 1
    threshold = u * total
    pick = (cumulative <= threshold).sum(dim=-1, keepdim=True)
    pick = torch.minimum(pick, ((kept > 0).sum(dim=-1, keepdim=True) - 1).clamp(min=0))  # never an id of mass 0
    decided = (top_k <= k) | (~cut & ((~uncut & drop[:, -1:]) | (uncut & (threshold < cumulative[:, -1:]))))
    decided = decided & whole[:, None]
    return order.gather(1, pick)[:, 0], decided[:, 0]


class SamplerRows:
    """The sampler's per-row state on the device: one row per running request (and any scratch rows):
    its context's token counts, its stop ids, its settings (one packed tensor, one gather per step)."""

    def __init__(self, rows, vocab, device):
        self.counts = torch.zeros(rows, vocab, device=device)
        self.stop_masks = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.settings = packed([SamplingParams()] * rows, device)

    def admit(self, row, prompt_ids, params, stop_ids):
        """Row `row` takes a request: counts of its prompt, its stop ids, its settings."""
        vocab = self.counts.shape[1]
        self.counts[row] = torch.bincount(torch.tensor(prompt_ids), minlength=vocab).to(self.counts)
        self.stop_masks[row] = False
        self.stop_masks[row, sorted(i for i in stop_ids if i < vocab)] = True
        self.settings[row] = packed([params])[0]

    def draw(self, logits, rows, steps, masks=None):
        """sample() for the rows `rows` of the state, then count the chosen ids into their rows. No host
        synchronisation: it runs inside CUDA graphs too."""
        chosen = sample(logits, self.counts[rows], unpack(self.settings[rows]), steps, self.stop_masks[rows], masks)
        self.counts.view(-1).index_add_(0, rows * self.counts.shape[1] + chosen,
                                        torch.ones_like(chosen, dtype=self.counts.dtype))
        return chosen
