"""The model runner: the one owner of device state (the model, the KV tensors, the block tables, the
sampler's rows). A step is prepare (tables; constrained rows' grammar masks, on the host) -> forward ->
sample over the scheduled sequences; the CPU and CUDA differ only in the attention function (in torch:
decode rows together, prompt chunks per sequence; or the Triton decode kernel and SDPA prefill: `paged`)
and in whether the decode rows replay a CUDA graph (prompt chunks then run apart).
"""

import time

import torch

from .. import cdiv
from ..grammar import fill_masks, words
from ..model.attention import DecodeRows, attend, decode_attention, prefill_attention, splits_for
from ..model.cpu_kernels import DecodeStep
from ..model.cpu_linear import PromptTiles
from ..model.fused import FUSED, TORCH
from ..model.llama import KVCache
from ..model.sampler import SamplerRows
from .cuda_graphs import CudaGraphs


class ModelRunner:
    def __init__(self, model, cache, block_size, max_batch, paged=False, graph_buckets=()):
        """cache: blocks of the pool plus one scratch block (where a graph's padding rows write). Sampler rows:
        one per running request plus a scratch row (where padding rows sample)."""
        self.model, self.cache, self.bs = model, cache, block_size
        self.device = model.device
        self.paged = paged or self.device.type == "cuda"
        self.ops = FUSED if self.paged else TORCH  # the layers' small operations: Triton kernels, or torch
        self.scratch_row = max_batch
        self.scratch_block = cache.keys[0].shape[0] // block_size - 1
        width = cdiv(model.config.context_length, block_size)
        self.tables = torch.full((max_batch + 1, width), self.scratch_block, dtype=torch.int32, device=self.device)
        self.synced = [0] * (max_batch + 1)  # blocks of each row's table already written to `tables`
        self.sampler = SamplerRows(max_batch + 1, model.config.vocab_size, self.device)
        # token masks of the step's sampling rows, written on the host (pinned on CUDA); -1: every id allowed
        self.masks = torch.full((max_batch + 1, words(model.config.vocab_size)), -1, dtype=torch.int32)
        self.masks = self.masks.pin_memory() if self.device.type == "cuda" else self.masks
        self.processors = (torch.cuda.get_device_properties(self.device).multi_processor_count
                           if self.device.type == "cuda" else 4)
        self.logits = None  # the last step's logits, one row per sampling sequence (until the next step)
        self.stats = {"forward_seconds": 0.0, "sample_seconds": 0.0, "graph_steps": 0, "eager_steps": 0,
                      "kernel_steps": 0}
        # the CPU's decode rows in one call of the kernel library, where every Linear runs on it
        self.step = DecodeStep.of(model, cache) if not self.paged else None
        buckets = [b for b in graph_buckets if b <= max_batch]
        self.graphs = (CudaGraphs(self.decode, buckets, self.scratch_row, self.masks.shape[1], self.device)
                       if buckets else None)
        if self.graphs and self.graphs.graphed:
            self.graphs.capture()

    def admit(self, seq):
        """A sequence took a sampler row: reset that row's sampler state and block table."""
        self.sampler.admit(seq.row, seq.prompt, seq.params, seq.stop_ids)
        self.synced[seq.row] = 0

    @torch.inference_mode()
    def run(self, seqs):
        """One step over the scheduled sequences (decode rows first) -> the ids drawn for those that sample."""
        started = time.perf_counter()
        self._sync_tables(seqs)
        decode = [s for s in seqs if not s.prefilling]
        b = self.graphs.bucket(len(decode)) if self.graphs and decode else None
        if b is None:
            self.stats["eager_steps"] += 1
            return self._eager(seqs, started)
        rows = [[s.last for s in decode], [s.start for s in decode], [s.row for s in decode], [s.generated for s in decode]]
        ids, self.logits = self.graphs.run(rows, b, self._masks(decode))
        self.stats["graph_steps"] += 1
        self.stats["forward_seconds"] += time.perf_counter() - started
        if len(decode) < len(seqs):  # prompt chunks run in a pass of their own: decode rows keep their graph
            graphed = self.logits
            more = self._eager(seqs[len(decode):], time.perf_counter())
            self.stats["eager_steps"] += 1
            if more:
                ids, self.logits = ids + more, torch.cat([graphed, self.logits])
        return ids

    # -- prepare ---------------------------------------------------------------------------------------

    def _sync_tables(self, seqs):
        """Write the blocks sequences took since the last step into their rows of the device's table."""
        rows, cols, blocks = [], [], []
        for s in seqs:
            table, done = s.block_table, self.synced[s.row]
            if len(table) > done:
                rows += [s.row] * (len(table) - done)
                cols += range(done, len(table))
                blocks += table[done:]
                self.synced[s.row] = len(table)
        if rows:  # one copy, from pinned memory without blocking the host on CUDA
            update = torch.tensor([rows, cols, blocks])
            update = update.pin_memory() if self.device.type == "cuda" else update
            update = update.to(self.device, non_blocking=True)
            self.tables[update[0], update[1]] = update[2].to(torch.int32)

    def _masks(self, sampling):
        """The grammar masks of the sampling sequences, in order, on the host ([n, words]; a free row allows
        every id); None when none is constrained."""
        constrained = [(s.constraint, i) for i, s in enumerate(sampling) if s.constraint is not None]
        if not constrained:
            return None
        host = self.masks[:len(sampling)]
        host.fill_(-1)
        fill_masks(constrained, host.data_ptr(), host.shape[1] * 4, len(sampling))
        return host

    def _slots(self, rows, positions):
        """The cache slot of each (sampler row's table, position)."""
        return self.tables[rows, positions // self.bs].long() * self.bs + positions % self.bs

    def _prefix_slots(self, row, length):
        """The slots of a row's table from position 0 to the end of the block holding position length - 1."""
        blocks = self.tables[row, :cdiv(length, self.bs)].long()
        return (blocks[:, None] * self.bs + torch.arange(self.bs, device=self.device)).reshape(-1)

    def _attention(self, spans, decode=0, decode_tables=None, decode_lengths=None):
        """attention(q, keys, values) over a flat batch. spans: (first row, rows, slots of every position to
        the end of the block holding its last, its length, prefill) per sequence. With `paged`, the first
        `decode` rows (one query each) go through the Triton kernel with their tables and lengths and the rest
        through SDPA; else the decode spans through one `DecodeRows` and each prompt span through `attend`.
        Rows beyond the spans are padding: zeros."""
        decode_rows = None
        if not self.paged and any(not prefill for *_, prefill in spans):
            decode_rows = DecodeRows([(first, slots, length) for first, _, slots, length, prefill in spans
                                      if not prefill], self.cache.keys[0].shape[0])
            spans = [span for span in spans if span[-1]]

        def attention(q, keys, values):
            if decode:
                splits = splits_for(decode, self.model.config.kv_heads, self.processors)
                decoded = decode_attention(q[:decode].contiguous(), keys, values, decode_tables, decode_lengths,
                                           self.bs, splits)
                if decode == q.shape[0]:  # every row decodes (a graph's step): no other rows to place
                    return decoded
            # in the cache's dtype: what the next Linear multiplies (bf16 on the CPU's integer path) either way
            out = torch.zeros_like(q, dtype=keys.dtype)
            if decode:
                out[:decode] = decoded
            if decode_rows is not None:
                decode_rows(q, keys, values, out)
            for first, count, slots, length, prefill in spans:
                if self.paged:
                    out[first:first + count] = prefill_attention(q[first:first + count], keys, values, slots[:length])
                else:
                    out[first:first + count] = attend(q[first:first + count], keys, values, slots, length, prefill,
                                                      self.bs)
            return out

        return attention

    # -- the two ways a step runs ---------------------------------------------------------------------

    def decode(self, inputs, masks):
        """A decode-only step as a CUDA graph captures it: inputs [4, B] (tokens, positions, sampler rows,
        steps), masks [B, words] -> (ids [B], logits [B, vocab]). Padding rows sample on the scratch row, write
        the scratch block."""
        tokens, positions, rows, steps = inputs[0], inputs[1], inputs[2], inputs[3]
        attention = self._attention([], tokens.shape[0], self.tables[rows], (positions + 1).to(torch.int32))
        hidden = self.model.layers_forward(tokens, positions, self._slots(rows, positions), self.cache, attention,
                                            self.ops)
        logits = self.model.lm_head(hidden)
        return self.sampler.draw(logits, rows, steps, masks), logits

    def _tiles(self, first, spans):
        """Where the prompt rows (from row `first`, (start, count) per sequence) go in the CPU Linears' dense
        products; None when the model has none or no row is a prompt row."""
        return PromptTiles(first, spans) if self.model.tiled and spans else None

    def _eager(self, seqs, started):
        """A step in eager mode: the leading decode rows through the kernel library's decode step where the
        model has one (cpu_kernels.DecodeStep), the rest through layers_forward; then the lm head and the draws."""
        stepped = 0
        while self.step is not None and stepped < len(seqs) and not seqs[stepped].prefilling:
            stepped += 1
        parts, last = [], []
        if stepped:
            parts.append(self._decode_step(seqs[:stepped]))
            last += [i for i, s in enumerate(seqs[:stepped]) if s.samples]
        if stepped < len(seqs):
            hidden, more = self._forward(seqs[stepped:])
            parts.append(hidden)
            last += [stepped + i for i in more]
        if not last:
            self.stats["forward_seconds"] += time.perf_counter() - started
            return []
        hidden = torch.cat(parts) if len(parts) > 1 else parts[0]
        dev = self.device
        self.logits = logits = self.model.lm_head(hidden[self._padded(last, dev)])[:len(last)]
        forward_done = time.perf_counter()
        sampling = [s for s in seqs if s.samples]
        rows = torch.tensor([s.row for s in sampling], device=dev)
        steps = torch.tensor([s.generated for s in sampling], device=dev)
        masks = self._masks(sampling)
        masks = masks.to(dev, non_blocking=True) if masks is not None else None
        ids = self.sampler.draw(logits, rows, steps, masks).tolist()
        self.stats["forward_seconds"] += forward_done - started
        self.stats["sample_seconds"] += time.perf_counter() - forward_done
        return ids

    def _decode_step(self, seqs):
        """Decode rows (one new position each) through cpu_kernels.DecodeStep -> their final-normed hidden states."""
        tokens = torch.tensor([s.last for s in seqs])
        positions = torch.tensor([s.start for s in seqs])
        rows = torch.tensor([s.row for s in seqs])
        self.stats["kernel_steps"] += 1
        return self.step(tokens, positions, self._slots(rows, positions), self.tables, rows, self.bs)

    def _forward(self, seqs):
        """layers_forward over a step's rows -> (hidden states, the rows that sample)."""
        tokens, positions, row_of, spans, last = [], [], [], [], []
        decode = sum(not s.prefilling for s in seqs) if self.paged else 0
        prompt = [(s.start, s.count) for s in seqs if s.prefilling]  # after the decode rows (run's order)
        tiles = self._tiles(sum(s.count for s in seqs) - sum(c for _, c in prompt), prompt)
        for i, s in enumerate(seqs):
            first = len(tokens)
            tokens += s.chunk_ids()
            positions += range(s.start, s.start + s.count)
            row_of += [s.row] * s.count
            if i >= decode:
                end = s.start + s.count
                spans.append((first, s.count, self._prefix_slots(s.row, end), end, s.prefilling))
            if s.samples:
                last.append(len(tokens) - 1)
        n, dev = len(tokens), self.device
        tokens, positions = self._padded(tokens, dev), self._padded(positions, dev)  # padding rows attend to nothing
        row_of = torch.tensor(row_of, device=dev)
        write = self._slots(row_of, positions[:n])
        attention = (self._attention(spans, decode, self.tables[row_of[:decode]], (positions[:decode] + 1).to(torch.int32))
                     if decode else self._attention(spans))
        return self.model.layers_forward(tokens, positions, write, self.cache, attention, self.ops, tiles), last

    def _padded(self, values, device):
        """A list of ints as a tensor of at least the model's min_rows rows (docs/batch-invariance.md), zeros
        appended."""
        return torch.tensor(values + [0] * (self.model.min_rows - len(values)), device=device)

    @torch.inference_mode()
    def prefill_logits(self, sequences):
        """Every position's logits of several sequences prefilled side by side in one flat batch, through a
        scratch cache (never the serving pool): the engine's reference method."""
        total = sum(cdiv(len(s), self.bs) for s in sequences)
        cache = KVCache(self.model.config, total, self.bs, self.device, self.cache.keys[0].dtype)
        tokens, positions, spans, block = [], [], [], 0
        for s in sequences:
            slots = torch.arange(block * self.bs, (block + cdiv(len(s), self.bs)) * self.bs, device=self.device)
            spans.append((len(tokens), len(s), slots, len(s), True))
            tokens += s
            positions += range(len(s))
            block += cdiv(len(s), self.bs)
        write = torch.cat([slots[:length] for _, _, slots, length, _ in spans])
        hidden = self.model.layers_forward(self._padded(tokens, self.device), self._padded(positions, self.device),
                                           write, cache, self._attention(spans), self.ops,
                                           self._tiles(0, [(0, len(s)) for s in sequences]))
        out = self.model.lm_head(hidden)
        return [out[first:first + count].float().cpu() for first, count, *_ in spans]
