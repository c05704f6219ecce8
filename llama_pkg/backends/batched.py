"""The package's own engine: its Llama forward, the paged KV cache and the continuous-batching
scheduler, behind the same interface as the other backends (ids in, sampled ids out)."""

import logging

import torch

from .. import settings
from . import concurrency
from . import model as llama
from .base import Sampling
from .cuda_step import buckets_up_to
from .kv_cache import BlockPool, KVCache
from .paged_attention import prefill_attention
from .scheduler import END, Request, Scheduler

log = logging.getLogger("llama_pkg")


def cache_blocks(config, block_size, budget_bytes, dtype):
    """Blocks that fit the budget, but never fewer than one full context needs (so any request that
    fits the context fits the pool) plus one block."""
    per_block = KVCache.bytes_per_token(config, dtype) * block_size
    return max(budget_bytes // per_block, -(-config.context_length // block_size) + 1)


class BatchedBackend:
    name = "batched"

    def __init__(self, folder, context_length, gptq=False, cuda=False, paged=False):
        """On the CPU: float32, GPTQ unpacked to floats. With cuda: fp16, GPTQ through ExLlamaV2's kernels,
        decode steps as CUDA graphs (cuda_step.py). paged: the CUDA step's code on the CPU (tests)."""
        self.context_length = context_length
        self.concurrency = concurrency(self.name, cuda=cuda)
        device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
        block_size = settings.integer("LLAMA_PKG_KV_BLOCK")
        chunk = settings.integer("LLAMA_PKG_PREFILL_CHUNK", cuda=cuda)
        if chunk % block_size:
            raise ValueError(f"LLAMA_PKG_PREFILL_CHUNK={chunk} must be a multiple of LLAMA_PKG_KV_BLOCK={block_size}")
        budget = settings.integer("LLAMA_PKG_KV_CACHE_MB", low=0 if cuda else 1, cuda=cuda) << 20
        reserve = settings.integer("LLAMA_PKG_GPU_RESERVE_MB", low=0) << 20

        def build():
            model = llama.load(folder, device=device, dtype=dtype, gptq=gptq)
            kv_budget = budget
            if cuda and not budget:  # automatic: what is free once the model is on the GPU
                free, _ = torch.cuda.mem_get_info()
                kv_budget = max(free - reserve, 0)
            blocks = cache_blocks(model.config, block_size, kv_budget, dtype)
            per_token = KVCache.bytes_per_token(model.config, dtype)
            log.info("KV cache on %s: block size %d, %d blocks, %.1f MiB, holds %d tokens (%d bytes each); at most "
                     "%d predictions at once, prefill chunk %d", device, block_size, blocks,
                     blocks * block_size * per_token / 2**20, blocks * block_size, per_token, self.concurrency, chunk)
            # one block beyond the pool: where a CUDA graph's padding rows write
            cache = KVCache(model.config, blocks + 1, block_size, device, dtype)
            return model, cache, BlockPool(blocks, block_size)

        graphs = settings.choice("LLAMA_PKG_CUDA_GRAPHS", ("0", "1")) == "1"
        buckets = buckets_up_to(self.concurrency) if (cuda and graphs) or paged else ()
        self.scheduler = Scheduler(build, self.concurrency, chunk, graph_buckets=buckets, paged=paged)
        self.model, self.pool = self.scheduler.model, self.scheduler.pool
        self.kv_cache_bytes = (self.pool.blocks + 1) * block_size * KVCache.bytes_per_token(self.model.config, dtype)

    def generate(self, prompt_ids, max_new_tokens, sampling, stop_ids, cancel=None):
        capacity = self.pool.blocks * self.pool.block_size
        if len(prompt_ids) + max_new_tokens > capacity:  # Engine.budget keeps requests within the context
            raise ValueError(f"{len(prompt_ids)} prompt ids + {max_new_tokens} new tokens exceed the KV cache's "
                             f"{capacity} positions")
        request = self.scheduler.submit(Request(prompt_ids, max_new_tokens, sampling, stop_ids, cancel))
        yield from self._tokens(request)

    def _tokens(self, request):
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

    def step_logits(self, cases):
        """For each (prompt_ids, next_ids): the last position's logits after the prompt and after each of
        next_ids fed one at a time ([len(next_ids) + 1, vocab]), every case at once through the serving
        path (prompt chunks, then batched decode steps: CUDA graphs on CUDA). Reference checks only."""
        greedy = Sampling(temperature=0, top_p=1.0, repetition_penalty=1.0)
        requests = [self.scheduler.submit(Request(prompt, len(after) + 1, greedy, frozenset(), None, forced=list(after)))
                    for prompt, after in cases]
        for r in requests:
            for _ in self._tokens(r):
                pass
        return [torch.stack(r.logits) for r in requests]

    def logits(self, ids):
        """Logits for every position of one sequence (prefill only), through a scratch cache."""
        return self.prefill_logits([ids])[0]

    def prefill_logits(self, sequences):
        """Every position's logits of several sequences prefilled in one flat batch (a test and
        reference path, on the engine's thread; it uses a scratch cache, never the serving pool)."""
        return self.scheduler.call(lambda: self._prefill_logits(sequences))

    @torch.inference_mode()
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
        device = self.model.device
        if device.type == "cuda":  # the serving path's attention: SDPA over the paged cache
            write = torch.cat([r.slots[:r.count] for r in rows])

            def attention(q, keys, values):
                return torch.cat([prefill_attention(q[r.start:r.start + r.count], keys, values, r.slots[:r.count])
                                  for r in rows])

            hidden = self.model.layers_forward(torch.tensor(tokens, device=device),
                                               torch.tensor(positions, device=device), write, cache, attention)
            out = self.model.lm_head(hidden)
        else:
            out = self.model.forward(torch.tensor(tokens), torch.tensor(positions), rows, cache, all_logits=True)
        return [out[r.start:r.start + r.count].float().cpu() for r in rows]
