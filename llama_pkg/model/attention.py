"""Attention over the paged KV cache (slot = block * block_size + offset), three ways: on the CPU in torch,
`DecodeRows` (a step's decode rows, sequences of one padded length in one call) and `attend` (a prompt
chunk, one sequence at a time); `decode_attention`, a flash-decoding Triton kernel, one query per
sequence read through its block table (graph-capturable; tested on the CPU in Triton's interpreter
against `decode_attention_reference`); `prefill_attention`, a prompt chunk through torch SDPA.
"""

import torch
import torch.nn.functional as F

TILE = 64  # positions per inner iteration


def _kernels():
    """decode_kernel: one program per (sequence, key/value head, split) walks its share of the positions
    (tile i to split i % splits) with an online softmax for the query heads sharing the key head.
    merge_kernel: one program per (sequence, head) combines the splits (what `merge` does in torch). The
    split count is a runtime argument: one compile serves every batch."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["table_stride", "splits"])
    def decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, acc_ptr, ml_ptr, scale, table_stride, splits,
                      HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUPS: tl.constexpr, GROUPS_P: tl.constexpr,
                      DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, GROUPS_P)
        d = tl.arange(0, DIM)
        t = tl.arange(0, TILE)
        head = kvh * GROUPS + g
        q = tl.load(q_ptr + (b * HEADS + head)[:, None] * DIM + d[None, :], mask=(g < GROUPS)[:, None],
                    other=0.0).to(tl.float32)
        length = tl.load(lengths_ptr + b)
        m = tl.full([GROUPS_P], -float("inf"), tl.float32)
        total = tl.zeros([GROUPS_P], tl.float32)
        acc = tl.zeros([GROUPS_P, DIM], tl.float32)
        for start in range(split * TILE, length, splits * TILE):
            pos = start + t
            valid = pos < length
            block = tl.load(tables_ptr + b * table_stride + pos // BLOCK_SIZE, mask=valid, other=0)
            slot = (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * (KV_HEADS * DIM) + kvh * DIM
            k = tl.load(k_ptr + slot[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUPS_P, TILE]
            s = tl.where(valid[None, :], s, -float("inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + slot[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            total = total * alpha + tl.sum(p, axis=1)
            m = m_new
        out = (b * HEADS + head) * splits + split
        keep = g < GROUPS
        tl.store(acc_ptr + out[:, None] * DIM + d[None, :], acc, mask=keep[:, None])
        tl.store(ml_ptr + out * 2, m, mask=keep)
        tl.store(ml_ptr + out * 2 + 1, total, mask=keep)

    @triton.jit(do_not_specialize=["splits"])
    def merge_kernel(acc_ptr, ml_ptr, out_ptr, splits, SPLITS_P: tl.constexpr, DIM: tl.constexpr):
        bh = tl.program_id(0)
        s = tl.arange(0, SPLITS_P)
        d = tl.arange(0, DIM)
        keep = s < splits
        part = bh * splits + s
        m = tl.load(ml_ptr + part * 2, mask=keep, other=-float("inf"))
        total = tl.load(ml_ptr + part * 2 + 1, mask=keep, other=0.0)
        top = tl.max(m, axis=0)
        top = tl.where(top == -float("inf"), 0.0, top)  # no split saw a position: the output is 0
        w = tl.exp(m - top)  # 0 for empty splits
        acc = tl.load(acc_ptr + part[:, None] * DIM + d[None, :], mask=keep[:, None], other=0.0)
        denominator = tl.sum(total * w, axis=0)
        denominator = tl.where(denominator > 0, denominator, 1.0)
        tl.store(out_ptr + bh * DIM + d, (tl.sum(acc * w[:, None], axis=0) / denominator).to(out_ptr.dtype.element_ty))

    return decode_kernel, merge_kernel


DECODE_KERNEL = MERGE_KERNEL = None
MAX_SPLITS = 16


def splits_for(batch, kv_heads, processors=132):
    """Programs per sequence and head: enough for about two programs per multiprocessor, at most MAX_SPLITS."""
    return max(1, min(MAX_SPLITS, (2 * processors) // max(1, batch * kv_heads)))


def decode_attention(q, keys, values, tables, lengths, block_size, splits=1):
    """The Triton kernels, two launches; graph-capturable (fixed shapes, no host synchronisation)."""
    global DECODE_KERNEL, MERGE_KERNEL
    if DECODE_KERNEL is None:
        DECODE_KERNEL, MERGE_KERNEL = _kernels()
    import triton

    batch, heads, dim = q.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    if dim & (dim - 1) or keys.stride(0) != kv_heads * dim or not q.is_contiguous() or splits > MAX_SPLITS:
        raise ValueError(f"decode_attention needs a power-of-two head dim, contiguous q and cache, at most "
                         f"{MAX_SPLITS} splits")
    acc = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    ml = torch.empty(batch, heads, splits, 2, dtype=torch.float32, device=q.device)
    DECODE_KERNEL[(batch, kv_heads, splits)](
        q, keys, values, tables, lengths, acc, ml, dim ** -0.5, tables.stride(0), splits,
        HEADS=heads, KV_HEADS=kv_heads, GROUPS=groups, GROUPS_P=triton.next_power_of_2(groups),
        DIM=dim, BLOCK_SIZE=block_size, TILE=TILE)
    out = torch.empty_like(q)
    MERGE_KERNEL[(batch * heads,)](acc, ml, out, splits, SPLITS_P=MAX_SPLITS, DIM=dim)
    return out


def merge(acc, m, total):
    """merge_kernel in torch (its reference): partial softmax results [B, H, S, D], [B, H, S] -> [B, H, D];
    a split with no position has m = -inf."""
    top = m.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(m - top)  # 0 for empty splits
    denominator = (total * w).sum(-1)
    out = (acc * w[..., None]).sum(-2) / torch.where(denominator > 0, denominator, torch.ones_like(denominator))[..., None]
    return out


def decode_attention_reference(q, keys, values, tables, lengths, block_size):
    """The same result in plain torch, one sequence at a time (CPU tests and any device)."""
    batch, heads, dim = q.shape
    groups = heads // keys.shape[1]
    out = torch.zeros(batch, heads, dim, dtype=torch.float32, device=q.device)
    for b in range(batch):
        n = int(lengths[b])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        slots = tables[b, pos // block_size].long() * block_size + pos % block_size
        k = keys[slots].float().repeat_interleave(groups, dim=1)  # [n, heads, dim]
        v = values[slots].float().repeat_interleave(groups, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * dim ** -0.5
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)
    return out.to(q.dtype)


def prefill_attention(q, keys, values, slots):
    """Causal attention of a prompt chunk q [count, heads, dim], the last `count` of the positions whose
    keys and values sit at `slots` (lower-right aligned: the chunk may continue a cached prefix), through
    torch SDPA's fused kernels. cuDNN's is left out: on torch 2.11 / H100 it stalled up to 0.7 s at each
    new prompt length (benchmarks/RESULTS.md)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    count, heads, dim = q.shape
    length, kv_heads = slots.shape[0], keys.shape[1]
    k, v = keys[slots].transpose(0, 1), values[slots].transpose(0, 1)  # [kv_heads, length, dim]
    if heads != kv_heads:
        k, v = k.repeat_interleave(heads // kv_heads, dim=0), v.repeat_interleave(heads // kv_heads, dim=0)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None],
                                             attn_mask=causal_lower_right(count, length))
    return out[0].transpose(0, 1)


def attend(q, keys, values, slots, length, prefill, tile):
    """Causal attention of q [count, heads, dim], the last `count` of a sequence's first `length`
    positions, whose keys and values sit at `slots` of the cache; grouped-query, in torch (the CPU).

    A decode step is one query over the `length` positions. A prompt position's result must not depend on
    where its chunk starts or ends (a later request may reuse its keys: prefix reuse, or compute it in a
    chunk of another size), so prompt queries go in tiles of `tile` rows at fixed positions (multiples of
    `tile`, padded with zero rows), each over the keys up to the tile's end: every product's shape is set
    by the position alone. `slots` reaches the last tile's end (tile divides the block size)."""
    count, heads, dim = q.shape
    if not prefill:
        out = torch.empty_like(q)
        DecodeRows([(0, slots, length)], keys.shape[0])(q, keys, values, out)
        return out
    first = length - count
    out = torch.empty_like(q)
    for start in range(first - first % tile, length, tile):
        end, low, high = start + tile, max(start, first), min(start + tile, length)
        rows = q.new_zeros(tile, heads, dim)
        rows[low - start:high - start] = q[low - first:high - first]
        allowed = torch.ones(tile, end, dtype=torch.bool, device=q.device).tril(start)  # row r: keys <= start + r
        out[low - first:high - first] = _attention(rows, keys.index_select(0, slots[:end]),
                                                   values.index_select(0, slots[:end]), allowed)[
            low - start:high - start]
    return out


PAD = 64  # a decode query reads its sequence's keys to a multiple of PAD positions


class DecodeRows:
    """The decode rows of a CPU step (one query each), attended in few calls: each sequence's keys and
    values are read to a multiple of PAD positions (masked beyond its length), and the sequences of one padded
    length go through one SDPA call, the query heads that share a key head as rows. ATen's CPU flash kernel
    computes each (sequence, key head) of a call apart, summing over positions in blocks set by the padded
    length alone, so a row's bits depend on neither the other sequences of its call nor their count. A
    masked position adds exactly nothing (its weight underflows to 0; the cache holds finite values), so what
    the padding holds does not matter: gathered, it repeats position 0; a sequence alone in its call whose
    slots run in order is read in place (a view of the cache, no gather). The products run in float32 (the
    cache's keys and values cast once a call): ATen's float32 flash kernel is faster than its bf16 one on the
    CPUs measured (benchmarks/RESULTS.md), and the queries keep their float32 bits."""

    def __init__(self, spans, pool_slots):
        """spans: (row, slots of its positions from 0, length) per sequence; pool_slots: the cache's slot
        count."""
        by_length = {}
        for row, slots, length in spans:
            by_length.setdefault(-(-length // PAD) * PAD, []).append((row, slots, length))
        index, self.groups = [], []
        for padded, group in by_length.items():
            mask = torch.zeros(len(group), 1, 1, padded)
            for i, (_, slots, length) in enumerate(group):
                mask[i, :, :, length:] = -float("inf")
            rows = [row for row, _, _ in group]
            if rows == list(range(rows[0], rows[0] + len(rows))):
                rows = slice(rows[0], rows[0] + len(rows))  # in order (the usual case): a view, no gather
            if len(group) == 1:  # alone: read in place if its slots run in order within the pool
                _, slots, length = group[0]
                first = int(slots[0])
                if first + padded <= pool_slots and torch.equal(slots[:length], torch.arange(first, first + length)):
                    self.groups.append((rows, 1, padded, mask, first))
                    continue
            self.groups.append((rows, len(group), padded, mask, None))
            for _, slots, length in group:
                index += [slots[:length], slots[:1].expand(padded - length)]
        self.index = torch.cat(index) if index else None

    def __call__(self, q, keys, values, out):
        """q [rows, heads, dim] -> out's rows of these sequences."""
        heads, dim = q.shape[1], q.shape[2]
        kv_heads = keys.shape[1]
        if self.index is not None:
            gathered_k, gathered_v = keys.index_select(0, self.index).float(), values.index_select(0, self.index).float()
        start = 0
        for rows, n, padded, mask, first in self.groups:
            if first is None:
                k, v = gathered_k[start:start + n * padded], gathered_v[start:start + n * padded]
                start += n * padded
            else:
                k, v = keys[first:first + padded].float(), values[first:first + padded].float()
            result = F.scaled_dot_product_attention(
                q[rows].view(n, kv_heads, heads // kv_heads, dim).float(),
                k.view(n, padded, kv_heads, dim).transpose(1, 2), v.view(n, padded, kv_heads, dim).transpose(1, 2),
                attn_mask=mask)
            out[rows] = result.view(n, heads, dim).to(out.dtype)


def _attention(q, k, v, allowed):
    """Softmax attention of q [rows, heads, dim] over k, v [length, kv_heads, dim]; allowed: None (every
    position) or [rows, length] bool."""
    rows, heads, dim = q.shape
    length, kv_heads = k.shape[0], k.shape[1]
    groups = heads // kv_heads
    k, v = k.to(q.dtype), v.to(q.dtype)  # a bf16 cache's positions in float32
    # [kv_heads, rows * groups, dim]: the query heads that share a key head are rows of one product
    q = q.reshape(rows, kv_heads, groups, dim).permute(1, 0, 2, 3).reshape(kv_heads, rows * groups, dim)
    k, v = k.transpose(0, 1), v.transpose(0, 1)  # [kv_heads, length, dim]
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(dim ** -0.5)
    if allowed is not None:
        scores = scores.view(kv_heads, rows, groups, length).masked_fill_(~allowed[None, :, None, :], -float("inf"))
        scores = scores.view(kv_heads, rows * groups, length)
    out = torch.bmm(torch.softmax(scores, dim=-1), v)
    return out.view(kv_heads, rows, groups, dim).permute(1, 0, 2, 3).reshape(rows, heads, dim)
