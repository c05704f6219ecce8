"""The package's own engine: its Llama forward, the paged KV cache and the continuous-batching
scheduler, behind the same interface as the other backends (ids in, sampled ids out)."""

import logging

import torch

from .. import settings
from . import concurrency
from . import model as llama
from .kv_cache import BlockPool, KVCache
from .scheduler import END, Request, Scheduler

log = logging.getLogger("llama_pkg")


def cache_blocks(config, block_size, budget_bytes, dtype):
    """Blocks that fit the budget, but never fewer than one full context needs (so any request that
    fits the context fits the pool) plus one block."""
    per_block = KVCache.bytes_per_token(config, dtype) * block_size
    return max(budget_bytes // per_block, -(-config.context_length // block_size) + 1)


class BatchedBackend:
    name = "batched"

    def __init__(self, folder, context_length, gptq=False, device="cpu", dtype=torch.float32):
        self.context_length = context_length
        self.concurrency = concurrency(self.name)
        block_size = settings.integer("LLAMA_PKG_KV_BLOCK")
        chunk = settings.integer("LLAMA_PKG_PREFILL_CHUNK")
        if chunk % block_size:
            raise ValueError(f"LLAMA_PKG_PREFILL_CHUNK={chunk} must be a multiple of LLAMA_PKG_KV_BLOCK={block_size}")
        budget = settings.integer("LLAMA_PKG_KV_CACHE_MB") << 20

        def build():
            model = llama.load(folder, device=device, dtype=dtype, gptq=gptq)
            blocks = cache_blocks(model.config, block_size, budget, dtype)
            per_token = KVCache.bytes_per_token(model.config, dtype)
            log.info("KV cache: block size %d, %d blocks, %.1f MiB, holds %d tokens (%d bytes each); at most %d "
                     "predictions at once, prefill chunk %d", block_size, blocks,
                     blocks * block_size * per_token / 2**20, blocks * block_size, per_token, self.concurrency, chunk)
            return model, KVCache(model.config, blocks, block_size, device, dtype), BlockPool(blocks, block_size)

        self.scheduler = Scheduler(build, self.concurrency, chunk)
        self.model, self.pool = self.scheduler.model, self.scheduler.pool

    def generate(self, prompt_ids, max_new_tokens, sampling, stop_ids, cancel=None):
        capacity = self.pool.blocks * self.pool.block_size
        if len(prompt_ids) + max_new_tokens > capacity:  # Engine.budget keeps requests within the context
            raise ValueError(f"{len(prompt_ids)} prompt ids + {max_new_tokens} new tokens exceed the KV cache's "
                             f"{capacity} positions")
        request = self.scheduler.submit(Request(prompt_ids, max_new_tokens, sampling, stop_ids, cancel))
        try:
            while True:
                item = request.out.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancel.set()
            self.scheduler.poke()

    def logits(self, ids):
        """Logits for every position of one sequence (prefill only), through a scratch cache."""
        return self.prefill_logits([ids])[0]

    def prefill_logits(self, sequences):
        """Every position's logits of several sequences prefilled in one flat batch (a test and
        reference path, on the engine's thread; it uses a scratch cache, never the serving pool)."""
        return self.scheduler.call(lambda: self._prefill_logits(sequences))

    def _prefill_logits(self, sequences):
        bs = self.pool.block_size
        total = sum(-(-len(s) // bs) for s in sequences)
        cache = KVCache(self.model.config, total, bs, self.model.device, self.model.dtype)
        rows, tokens, positions, first_block = [], [], [], 0
        for s in sequences:
            n_blocks = -(-len(s) // bs)
            slots = torch.arange(first_block * bs, (first_block + n_blocks) * bs, device=self.model.device)
            rows.append(llama.Rows(start=len(tokens), count=len(s), position=0, slots=slots, prefill=True))
            tokens += s
            positions += range(len(s))
            first_block += n_blocks
        out = self.model.forward(torch.tensor(tokens), torch.tensor(positions), rows, cache, all_logits=True)
        return [out[r.start:r.start + r.count].float() for r in rows]
