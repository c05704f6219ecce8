"""Continuous batching: one thread runs engine steps for every request at once.

Each step is one forward over a flat batch: one decode row for every request that is generating,
plus prompt chunks of requests being prefilled (at most `chunk` prompt positions per step), then one
batched draw for every row that ended on a sampling position. Only the chosen ids leave the device.

A request waits in arrival order until the block pool can hold its prompt plus max_new_tokens and a
sampler row is free; it leaves at once when it finishes, fails or is cancelled, and its blocks go back.

A request's tokens depend only on its own inputs and seed: its prompt is cut into chunks at fixed
positions (multiples of `chunk`), rows are batch-invariant (model.py), attention and sampling run per
request, and prefix blocks are reused only when they hold exactly what the request would compute.

The scheduler's thread is the only one that computes with torch, loading the model included: with
OpenMP, a second thread's parallel regions run about half as fast once another thread has had its
own (measured on this 2-core machine: 16 vs 10 ms for the same products). Anything else that must
compute beside the engine (a reference model in a benchmark) runs on this thread through `call`.
"""

import logging
import queue
import threading
import time
from collections import deque

import torch

from . import batch_sampler
from .base import Sampling
from .kv_cache import block_hashes
from .model import Rows

log = logging.getLogger("llama_pkg")
END = object()


class Request:
    def __init__(self, prompt_ids, max_new_tokens, sampling, stop_ids, cancel, forced=None):
        """forced: ids fed back instead of the sampled ones, and every sampled position's logits recorded in
        `logits` (teacher forcing: the reference checks of the decode path)."""
        self.prompt, self.max_new, self.sampling, self.stop_ids = list(prompt_ids), max_new_tokens, sampling, stop_ids
        self.forced, self.logits = forced, []
        self.cancel = cancel or threading.Event()
        self.out = queue.SimpleQueue()  # sampled ids, then END or an exception
        self.table, self.slots, self.row = [], None, None
        self.computed = 0  # positions whose keys and values are in the cache
        self.generated = 0
        self.reserved = 0  # blocks reserved at admission, not yet taken
        self.registered = 0  # prompt blocks registered for prefix reuse
        self.last = None  # the last sampled id, fed in the next decode step
        self.hashes = []  # the prefix hash of each full prompt block
        self.synced = 0  # blocks of the table already written to the device's block table (CUDA)

    @property
    def prefilling(self):
        return self.computed < len(self.prompt)


class Scheduler:
    def __init__(self, build, max_batch, chunk, graph_buckets=(), paged=False):
        """build() -> (model, cache, pool), run on the scheduler's thread; its exception is raised here.
        On CUDA (or with `paged`, the CPU tests of that path) steps run through cuda_step.CudaStep: decode
        steps of up to max(graph_buckets) requests replay CUDA graphs."""
        self.max_batch, self.chunk, self.graph_buckets, self.paged = max_batch, chunk, graph_buckets, paged
        self.free_rows = list(range(max_batch - 1, -1, -1))
        self.waiting, self.running, self.calls = deque(), [], deque()
        self.wake = threading.Condition()
        self.stats = {"steps": 0, "step_seconds": 0.0, "forward_seconds": 0.0, "sample_seconds": 0.0,
                      "prefix_tokens_reused": 0, "max_running": 0}
        self.last_logits = None  # the last step's logits, one row per sampling request (teacher forcing)
        built = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, args=(build, built), name="llama_pkg-engine", daemon=True)
        self.thread.start()
        error = built.get()
        if error is not None:
            raise error

    def _run(self, build, built):
        try:
            self.model, self.cache, self.pool = build()
            self.device = self.model.device
            vocab = self.model.config.vocab_size
            # one row per running request, plus a scratch row for the padding rows of a CUDA graph
            rows = self.max_batch + 1
            self.counts = torch.zeros(rows, vocab, device=self.device)
            self.stop_masks = torch.zeros(rows, vocab, dtype=torch.bool, device=self.device)
            self.settings = batch_sampler.Settings.of([Sampling()] * rows, self.device)
            self.cuda = None
            if self.device.type == "cuda" or self.paged:
                from .cuda_step import CudaStep

                self.cuda = CudaStep(self, self.graph_buckets)
        except Exception as e:  # noqa: BLE001 - handed to the constructor's caller
            built.put(e)
            return
        built.put(None)
        self._loop()

    def call(self, fn):
        """Run fn() on the engine's thread between steps; its result (or exception)."""
        done = queue.SimpleQueue()
        with self.wake:
            self.calls.append((fn, done))
            self.wake.notify()
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def submit(self, request):
        with self.wake:
            self.waiting.append(request)
            self.wake.notify()
        return request

    def poke(self):
        """A request was cancelled from outside: let the loop see it even when idle."""
        with self.wake:
            self.wake.notify()

    # -- the loop ------------------------------------------------------------------------------------

    def _loop(self):
        while True:
            with self.wake:
                while not self.waiting and not self.running and not self.calls:
                    self.wake.wait()
                calls, self.calls = self.calls, deque()
                self._drop_cancelled()
                self._admit()
            for fn, done in calls:
                try:
                    done.put((True, fn()))
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    done.put((False, e))
            if self.running:
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - the step's requests fail, the loop goes on
                    log.exception("engine step failed")
                    for r in list(self.running):
                        self._finish(r, e)

    def _drop_cancelled(self):
        for r in [r for r in self.waiting if r.cancel.is_set()]:
            self.waiting.remove(r)
            r.out.put(END)
        for r in [r for r in self.running if r.cancel.is_set()]:
            self._finish(r)

    def _admit(self):
        while self.waiting and self.free_rows:
            r, bs = self.waiting[0], self.pool.block_size
            if not r.hashes:
                r.hashes = block_hashes(r.prompt, bs, len(r.prompt) // bs)
            total = len(r.prompt) + r.max_new
            # at least one prompt position is always computed: its logits give the first token
            prefix = self.pool.admit(r.hashes[:(len(r.prompt) - 1) // bs], total)
            if prefix is None:
                break  # arrival order: nobody overtakes the oldest waiting request
            self.waiting.popleft()
            r.row = self.free_rows.pop()
            r.table = list(prefix)
            r.reserved = self.pool.blocks_for(total) - len(prefix)
            r.computed = len(prefix) * bs
            r.registered = len(prefix)
            self.running.append(r)
            try:
                r.slots = self._slots_of(r.table)
                self.counts[r.row] = torch.bincount(torch.tensor(r.prompt), minlength=self.counts.shape[1]).to(
                    self.counts)
                self.stop_masks[r.row] = False
                self.stop_masks[r.row, sorted(i for i in r.stop_ids if i < self.stop_masks.shape[1])] = True
                self.settings.write(r.row, r.sampling)
            except Exception as e:  # noqa: BLE001 - a device fault (a CUDA error stays): it fails, nothing hangs
                log.exception("admitting a request failed")
                self._finish(r, e)
                continue
            self.stats["prefix_tokens_reused"] += r.computed
        self.stats["max_running"] = max(self.stats["max_running"], len(self.running))

    def _slots_of(self, blocks):
        bs = self.pool.block_size
        if not blocks:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        return (torch.tensor(blocks, device=self.device)[:, None] * bs + torch.arange(bs, device=self.device)).reshape(-1)

    def _grow(self, r, positions):
        """Take reserved blocks until the request has room for `positions` positions."""
        new = []
        while (len(r.table) + len(new)) * self.pool.block_size < positions:
            new.append(self.pool.take())
            r.reserved -= 1
        if new:
            r.table += new
            r.slots = torch.cat([r.slots, self._slots_of(new)])

    def _plan(self):
        """This step's rows: (request, first position, count, samples) for decode rows, then prompt chunks."""
        plan = [(r, r.computed, 1, True) for r in self.running if not r.prefilling]
        budget = self.chunk
        for r in self.running:
            if budget <= 0:
                break
            if r.prefilling:
                end = min((r.computed // self.chunk + 1) * self.chunk, len(r.prompt))
                if end - r.computed > budget:
                    break  # a chunk is never split, so its bounds do not depend on other requests
                plan.append((r, r.computed, end - r.computed, end == len(r.prompt)))
                budget -= end - r.computed
        return plan

    def _step(self):
        started = time.perf_counter()
        plan = self._plan()
        for r, first, count, _ in plan:
            self._grow(r, first + count)
        sampling = [r for (r, _, _, samples) in plan if samples]
        ids = self.cuda.run(plan, sampling) if self.cuda else self._forward_and_draw(plan, sampling)
        for r, first, count, _ in plan:
            r.computed = first + count
            while r.registered < len(r.hashes) and (r.registered + 1) * self.pool.block_size <= r.computed:
                self.pool.register(r.table[r.registered], r.hashes[r.registered])
                r.registered += 1
        for i, (r, token) in enumerate(zip(sampling, ids)):
            if r.forced is not None:
                r.logits.append(self.last_logits[i].float().cpu())
                token = r.forced[r.generated] if r.generated < len(r.forced) else token
            r.generated += 1
            r.last = token
            r.out.put(token)
            if token in r.stop_ids or r.generated >= r.max_new:
                self._finish(r)
        self.stats["steps"] += 1
        self.stats["step_seconds"] += time.perf_counter() - started

    def _forward_and_draw(self, plan, sampling):
        """One forward over the plan's rows and one draw for the sampling ones (model.forward's per-sequence
        attention: the CPU path) -> the chosen ids. The only transfer from the device is the ids."""
        tokens, positions, seqs = [], [], []
        for r, first, count, samples in plan:
            seqs.append(Rows(start=len(tokens), count=count, position=first, slots=r.slots, logits=samples,
                             prefill=r.prefilling))
            tokens += r.prompt[first:first + count] if r.prefilling else [r.last]
            positions += range(first, first + count)
        t = time.perf_counter()
        logits = self.model.forward(torch.tensor(tokens, device=self.device),
                                    torch.tensor(positions, device=self.device), seqs, self.cache)
        forward_done = time.perf_counter()
        ids = []
        if sampling:
            rows = torch.tensor([r.row for r in sampling], device=self.device)
            steps = torch.tensor([r.generated for r in sampling], device=self.device)
            ids = batch_sampler.draw(logits, rows, steps, self.counts, self.stop_masks, self.settings).tolist()
        self.last_logits = logits
        self.stats["forward_seconds"] += forward_done - t
        self.stats["sample_seconds"] += time.perf_counter() - forward_done
        return ids

    def _finish(self, r, error=None):
        if r in self.running:
            self.running.remove(r)
            self.pool.release(r.table, r.reserved)
            r.table, r.reserved = [], 0
            self.free_rows.append(r.row)
        r.out.put(error if error is not None else END)
