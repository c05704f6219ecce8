"""One engine step on CUDA: decode steps replay CUDA graphs, steps with prompt chunks run eagerly.

A decode step (every running request adds one token) is captured at setup as one CUDA graph per
batch-size bucket: the whole forward (ExLlamaV2's GPTQ kernels, the Triton paged decode attention, the
KV cache writes) and the sampler. Its inputs are one small [4, bucket] tensor (token, position, sampler
row and step of each request) copied in before the replay; everything else it reads lives on the device
already: the block tables (rows of `tables`, written when a request takes blocks), each row's sampling
settings, token counts and stop masks. The chosen ids come back in one small copy.

A bucket's rows beyond the running requests are padding: they compute on a scratch sampler row and
write their keys and values into a scratch cache block, so a bucket's graph serves any smaller batch.

A step that also prefills prompt chunks runs the same layers eagerly: decode rows through the Triton
kernel, prompt chunks through SDPA (paged_attention.py).

On the CPU (tests only: BatchedBackend(paged=True)) the same step runs without graphs: a bucket's
padded inputs go through `decode` directly, and the Triton kernel runs in its interpreter.
"""

import logging
import time

import torch

from . import batch_sampler
from .paged_attention import decode_attention, prefill_attention, splits_for

log = logging.getLogger("llama_pkg")


def buckets_up_to(largest):
    """1, 2, 4, 8, 16, then steps of 16 up to 64, then of 32, and `largest` itself."""
    out, b = [], 1
    while b < largest:
        out.append(b)
        b = b * 2 if b < 16 else b + (16 if b < 64 else 32)
    return out + [largest]


def bucket_for(n, buckets):
    """The smallest bucket that holds n rows (None when n exceeds them all)."""
    return next((b for b in sorted(buckets) if b >= n), None)


class CudaStep:
    def __init__(self, scheduler, buckets):
        s = self.s = scheduler
        self.model, self.cache, self.bs = s.model, s.cache, s.pool.block_size
        self.device = s.device
        self.scratch_row, self.scratch_block = s.max_batch, s.pool.blocks  # the cache has one block beyond the pool
        width = -(-self.model.config.context_length // self.bs)
        self.tables = torch.full((s.max_batch + 1, width), self.scratch_block, dtype=torch.int32, device=self.device)
        self.graphed = self.device.type == "cuda"
        self.processors = torch.cuda.get_device_properties(self.device).multi_processor_count if self.graphed else 4
        self.buckets = sorted(b for b in buckets if b <= s.max_batch)
        self.graphs, self.outputs, self.logits = {}, {}, {}
        self.inputs = {b: self.padding(b) for b in self.buckets}
        self.host_in = {b: self.pinned(torch.zeros(4, b, dtype=torch.int64)) for b in self.buckets}
        self.host_out = self.pinned(torch.zeros(max(self.buckets or [1]), dtype=torch.int64))
        self.done = torch.cuda.Event() if self.graphed else None
        self.stats = {"graph_steps": 0, "eager_steps": 0, "capture_seconds": 0.0, "capture_errors": []}
        if self.buckets and self.graphed:
            self.capture()

    def pinned(self, t):
        return t.pin_memory() if self.graphed else t

    # -- the decode step, as captured ----------------------------------------------------------------

    def decode(self, inputs):
        """inputs [4, B]: tokens, positions, sampler rows, steps -> (chosen ids [B], logits [B, vocab])."""
        tokens, positions, rows, steps = inputs[0], inputs[1], inputs[2], inputs[3]
        tables = self.tables[rows]
        write = tables.gather(1, (positions // self.bs)[:, None])[:, 0].long() * self.bs + positions % self.bs
        lengths = (positions + 1).to(torch.int32)
        splits = splits_for(tokens.shape[0], self.model.config.kv_heads, self.processors)

        def attention(q, keys, values):
            return decode_attention(q.contiguous(), keys, values, tables, lengths, self.bs, splits)

        hidden = self.model.layers_forward(tokens, positions, write, self.cache, attention)
        logits = self.model.lm_head(hidden)
        s = self.s
        return batch_sampler.draw(logits, rows, steps, s.counts, s.stop_masks, s.settings), logits

    def padding(self, b):
        inputs = torch.zeros(4, b, dtype=torch.int64, device=self.device)
        inputs[2] = self.scratch_row
        return inputs

    @torch.inference_mode()
    def capture(self):
        """One graph per bucket, largest first (the smaller ones reuse its memory pool)."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for b in sorted(self.buckets, reverse=True):
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm up: Triton compiles, cuBLAS picks its kernels
                    self.decode(self.inputs[b])
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[b], self.logits[b] = self.decode(self.inputs[b])
                self.graphs[b] = graph
            except RuntimeError as e:  # that batch size then runs eagerly: slower, still correct
                log.warning("CUDA graph of %d rows not captured (%s): those steps run eagerly", b, e)
                self.stats["capture_errors"].append(f"{b} rows: {e}")
                torch.cuda.synchronize()
        self.buckets = sorted(self.graphs)
        self.stats["capture_seconds"] = time.perf_counter() - started
        log.info("CUDA graphs: %d decode buckets (%s) captured in %.1f s", len(self.buckets),
                 ", ".join(map(str, self.buckets)), self.stats["capture_seconds"])

    # -- a step ----------------------------------------------------------------------------------------

    def sync_tables(self, plan):
        """Write the blocks requests took since the last step into their rows of the device's table."""
        rows, cols, blocks = [], [], []
        for r, _, _, _ in plan:
            if len(r.table) > r.synced:
                rows += [r.row] * (len(r.table) - r.synced)
                cols += range(r.synced, len(r.table))
                blocks += r.table[r.synced:]
                r.synced = len(r.table)
        if rows:
            self.tables[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)] = \
                torch.tensor(blocks, dtype=torch.int32, device=self.device)

    @torch.inference_mode()
    def run(self, plan, sampling):
        """plan: (request, first position, count, samples), decode rows first -> the sampled ids."""
        started = time.perf_counter()
        self.sync_tables(plan)
        b = bucket_for(len(plan), self.buckets)
        if b is not None and all(not r.prefilling for r, _, _, _ in plan):
            ids = self.replay(plan, b)
            self.stats["graph_steps"] += 1
        else:
            ids = self.eager(plan, sampling)
            self.stats["eager_steps"] += 1
        self.s.stats["forward_seconds"] += time.perf_counter() - started
        return ids

    def replay(self, plan, b):
        n = len(plan)
        host = self.host_in[b]  # pinned; free again once the previous step's copy was waited for
        host[:, n:] = 0
        host[2, n:] = self.scratch_row
        host[:, :n] = torch.tensor([[r.last for r, _, _, _ in plan], [first for _, first, _, _ in plan],
                                    [r.row for r, _, _, _ in plan], [r.generated for r, _, _, _ in plan]])
        self.inputs[b].copy_(host, non_blocking=True)
        if self.graphed:
            self.graphs[b].replay()
            self.host_out[:b].copy_(self.outputs[b], non_blocking=True)
            self.done.record()
            self.done.synchronize()
        else:
            self.outputs[b], self.logits[b] = self.decode(self.inputs[b])
            self.host_out[:b] = self.outputs[b]
        self.s.last_logits = self.logits[b]  # valid until the next replay
        return self.host_out[:n].tolist()

    def eager(self, plan, sampling):
        decode = [(r, first) for r, first, _, _ in plan if not r.prefilling]
        d = len(decode)
        tokens = [r.last for r, _ in decode]
        positions = [first for _, first in decode]
        chunks, writes, last = [], [], []
        for r, first, count, samples in plan[d:]:
            chunks.append((len(tokens), count, r.slots[:first + count]))
            writes.append(r.slots[first:first + count])
            tokens += r.prompt[first:first + count]
            positions += range(first, first + count)
            if samples:
                last.append(len(tokens) - 1)
        dev = self.device
        tokens, positions = torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev)
        decode_rows = torch.tensor([r.row for r, _ in decode], dtype=torch.long, device=dev)
        tables = self.tables[decode_rows]
        p = positions[:d]
        decode_write = tables.gather(1, (p // self.bs)[:, None])[:, 0].long() * self.bs + p % self.bs
        write = torch.cat([decode_write] + writes)
        splits = splits_for(max(d, 1), self.model.config.kv_heads, self.processors)

        def attention(q, keys, values):
            parts = [decode_attention(q[:d].contiguous(), keys, values, tables, (p + 1).to(torch.int32), self.bs,
                                      splits)] if d else []
            parts += [prefill_attention(q[start:start + count], keys, values, slots) for start, count, slots in chunks]
            return torch.cat(parts) if len(parts) > 1 else parts[0]

        hidden = self.model.layers_forward(tokens, positions, write, self.cache, attention)
        if not sampling:
            return []
        wanted = torch.tensor(list(range(d)) + last, device=dev)
        logits = self.model.lm_head(hidden[wanted])
        rows = torch.tensor([r.row for r in sampling], device=dev)
        steps = torch.tensor([r.generated for r in sampling], device=dev)
        s = self.s
        s.last_logits = logits
        return batch_sampler.draw(logits, rows, steps, s.counts, s.stop_masks, s.settings).tolist()
