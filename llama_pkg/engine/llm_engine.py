"""The package's own engine behind the backend protocol (ids in, sampled ids out). One thread runs every
step for every request at once: drop the cancelled, admit, schedule, run the model, post-process. It is
the only thread that computes with torch (loading included): with OpenMP a second computing thread slows
both, so other work that must compute beside the engine runs on its thread through `call`.
"""

import logging
import queue
import threading
import time
from collections import deque

import torch

from .. import cdiv, settings
from ..backends import concurrency
from ..model import cpu_kernels, cpu_linear, llama
from .block_manager import BlockPool
from .cuda_graphs import buckets_up_to
from .model_runner import ModelRunner
from .scheduler import Scheduler
from .sequence import END, Sequence

log = logging.getLogger("llama_pkg")
WAIT_LOG_SECONDS = 10


def cache_blocks(config, block_size, budget_bytes, dtype):
    """Blocks that fit the budget, but never fewer than one full context needs (so any request that
    fits the context fits the pool) plus one block."""
    per_block = llama.KVCache.bytes_per_token(config, dtype) * block_size
    return max(budget_bytes // per_block, cdiv(config.context_length, block_size) + 1)


class LLMEngine:
    name = "batched"
    structured = True  # takes a json_schema constraint (grammar masks per row)

    def __init__(self, folder, context_length, gptq=False, cuda=False, paged=False):
        """On the CPU: float32 activations, integer Linears (LLAMA_PKG_CPU_WEIGHTS). With cuda: fp16, GPTQ
        through ExLlamaV2's kernels, the Triton decode attention, decode steps as CUDA graphs. paged: the
        CUDA step's code on the CPU."""
        self.context_length = context_length
        self.concurrency = concurrency(self.name, cuda=cuda)
        self.device, self.dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
        self.block_size = settings.integer("LLAMA_PKG_KV_BLOCK")
        self.chunk = settings.integer("LLAMA_PKG_PREFILL_CHUNK", cuda=cuda)
        if self.chunk % self.block_size:
            raise ValueError(f"LLAMA_PKG_PREFILL_CHUNK={self.chunk} must be a multiple of "
                             f"LLAMA_PKG_KV_BLOCK={self.block_size}")
        self.budget = settings.integer("LLAMA_PKG_KV_CACHE_MB", low=0 if cuda else 1, cuda=cuda) << 20
        self.reserve = settings.integer("LLAMA_PKG_GPU_RESERVE_MB", low=0) << 20
        graphs = settings.choice("LLAMA_PKG_CUDA_GRAPHS", ("0", "1")) == "1"
        self.buckets = buckets_up_to(self.concurrency) if (cuda and graphs) or paged else ()
        self.paged, self.gptq, self.folder = paged, gptq, folder
        self.calls, self.wake, self.steps = deque(), threading.Condition(), {"steps": 0, "step_seconds": 0.0}
        self.closing = False
        built = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, args=(built,), name="llama_pkg-engine", daemon=True)
        self.thread.start()
        try:
            error = built.get()
        except KeyboardInterrupt:  # the thread finishes loading, then stops
            self.close()
            raise
        if error is not None:
            raise error

    def _build(self):
        kind = settings.choice("LLAMA_PKG_CPU_WEIGHTS", cpu_linear.KINDS) if self.device == "cpu" else None
        prompt = settings.choice("LLAMA_PKG_CPU_PROMPT", cpu_linear.PROMPT_KINDS) if kind else None
        kernels = None
        if kind and kind != "float32":
            kernels = cpu_kernels.load(settings.choice("LLAMA_PKG_CPU_KERNELS", cpu_kernels.MODES))
        self.model = llama.load(self.folder, device=self.device, dtype=self.dtype, gptq=self.gptq, cpu_weights=kind,
                                cpu_prompt=prompt, cpu_kernels=kernels)
        if kind:
            weights = "GPTQ 4-bit, repacked" if self.gptq else f"{kind}, quantized at load"
            products = (f"the package's integer kernels ({kernels.isa}), int8 activations in blocks of 32" if kernels
                        else "ATen's integer kernels, bf16 activations")
            rows = ("; prompt rows in bf16 products over a dense copy of those weights (%.0f MiB)" % (
                self.model.dense_bytes / 2**20) if self.model.tiled else "")
            log.info("CPU Linears: %s", "float32 matmuls (the reference setting)" if kind == "float32" else
                     f"{products} ({weights}, lm head int8){rows}")
        budget = self.budget
        if self.device == "cuda" and not budget:  # automatic: what is free once the model is on the GPU
            free, _ = torch.cuda.mem_get_info()
            budget = max(free - self.reserve, 0)
        kv = self.dtype if self.paged else self.model.kv_dtype  # the paged step's kernels take the model's
        blocks = cache_blocks(self.model.config, self.block_size, budget, kv)
        per_token = llama.KVCache.bytes_per_token(self.model.config, kv)
        log.info("KV cache on %s (%s): block size %d, %d blocks, %.1f MiB, holds %d tokens (%d bytes each); at "
                 "most %d predictions at once, prefill chunk %d", self.device, str(kv).replace("torch.", ""),
                 self.block_size, blocks,
                 blocks * self.block_size * per_token / 2**20, blocks * self.block_size, per_token, self.concurrency,
                 self.chunk)
        cache = llama.KVCache(self.model.config, blocks + 1, self.block_size, self.device, kv)
        self.pool = BlockPool(blocks, self.block_size)
        self.scheduler = Scheduler(self.pool, self.concurrency, self.chunk)
        self.runner = ModelRunner(self.model, cache, self.block_size, self.concurrency, self.paged, self.buckets)

    # -- the protocol ----------------------------------------------------------------------------------

    def generate(self, prompt_ids, max_new_tokens, params, stop_ids, cancel=None, constraint=None):
        capacity = self.pool.blocks * self.pool.block_size
        if len(prompt_ids) + max_new_tokens > capacity:  # the pipeline keeps requests within the context
            raise ValueError(f"{len(prompt_ids)} prompt ids + {max_new_tokens} new tokens exceed the KV cache's "
                             f"{capacity} positions")
        yield from self.tokens(self.submit(Sequence(prompt_ids, max_new_tokens, params, stop_ids, cancel, constraint)))

    def logits(self, ids):
        """Every position's logits of one sequence (prefill only, a scratch cache): the reference method."""
        return self.call(lambda: self.runner.prefill_logits([ids])[0])

    # -- talking to the engine's thread --------------------------------------------------------------

    def submit(self, seq):
        with self.wake:
            self.scheduler.add(seq)
            self.wake.notify()
        return seq

    def tokens(self, seq):
        """A submitted sequence's sampled ids as they come; closing it cancels the sequence. While it
        waits to start, it logs why and its place in the queue (on the consumer's thread: the
        prediction's own log), when that changes and every WAIT_LOG_SECONDS."""
        said, said_at = None, 0.0
        try:
            while True:
                try:
                    item = seq.out.get(timeout=1.0 if seq.row is None else None)
                except queue.Empty:
                    note = seq.queued
                    if note and (note != said or time.monotonic() - said_at >= WAIT_LOG_SECONDS):
                        log.info("waiting to start, place %d in the queue: %s", *note)
                        said, said_at = note, time.monotonic()
                    continue
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            seq.cancel.set()
            self.poke()

    def poke(self):
        """A sequence was cancelled from outside: let the loop see it even when idle."""
        with self.wake:
            self.wake.notify()

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

    def stats(self):
        return {**self.steps, **self.scheduler.stats, **self.runner.stats}

    def close(self):
        """Stop the engine's thread between two steps and wait for it (a process that exits while the
        thread is inside torch aborts); requests still there end with an error."""
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join(timeout=30)

    # -- the loop --------------------------------------------------------------------------------------

    def _run(self, built):
        try:
            self._build()
        except Exception as e:  # noqa: BLE001 - handed to the constructor's caller
            built.put(e)
            return
        built.put(None)
        while True:
            with self.wake:
                while not (self.scheduler.waiting or self.scheduler.running or self.calls or self.closing):
                    self.wake.wait()
                if self.closing:
                    closed = RuntimeError("the engine was closed")
                    for seq in list(self.scheduler.waiting) + list(self.scheduler.running):
                        self.scheduler.finish(seq, closed)
                    self.scheduler.waiting.clear()
                    for _, done in self.calls:
                        done.put((False, closed))
                    return
                calls, self.calls = self.calls, deque()
                self.scheduler.drop_cancelled()
                admitted = self.scheduler.admit()
            for seq in admitted:
                try:
                    self.runner.admit(seq)
                except Exception as e:  # noqa: BLE001 - a device fault: this request fails, nothing hangs
                    log.exception("admitting a request failed")
                    self.scheduler.finish(seq, e)
            for fn, done in calls:
                try:
                    done.put((True, fn()))
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    done.put((False, e))
            if self.scheduler.running:
                self._step()

    def _step(self):
        started = time.perf_counter()
        try:
            seqs = self.scheduler.schedule()
            self.scheduler.postprocess(seqs, self.runner.run(seqs))
        except BaseException as e:  # noqa: BLE001 - the step's requests fail, the loop goes on; a Rust
            if isinstance(e, (KeyboardInterrupt, SystemExit)):  # library's panic is a BaseException (pyo3)
                raise
            log.exception("engine step failed")
            for seq in list(self.scheduler.running):
                self.scheduler.finish(seq, e)
        self.steps["steps"] += 1
        self.steps["step_seconds"] += time.perf_counter() - started
