"""Decode steps captured as one CUDA graph per batch-size bucket (the forward and the sampler). A graph
reads one [4, bucket] input (token, position, sampler row and step of each row) and the rows' token masks
[bucket, words], copied in before the replay; rows beyond the batch are padding. Without CUDA (the CPU
tests) a bucket runs its function directly, so the same padded path is tested."""

import logging
import time

import torch

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


class CudaGraphs:
    def __init__(self, fn, buckets, padding_row, mask_words, device):
        """fn(inputs [4, B], masks [B, mask_words]) -> (ids [B], logits [B, vocab]); padding rows sample on
        `padding_row`."""
        self.fn, self.padding_row, self.device = fn, padding_row, device
        self.graphed = device.type == "cuda"
        self.buckets = sorted(buckets)
        self.inputs = {b: self.padding(b) for b in self.buckets}
        self.masks = {b: torch.full((b, mask_words), -1, dtype=torch.int32, device=device) for b in self.buckets}
        self.masked = set()  # buckets whose masks hold a constrained row's bits from an earlier step
        self.host_in = {b: self._pinned(torch.zeros(4, b, dtype=torch.int64)) for b in self.buckets}
        self.host_out = self._pinned(torch.zeros(max(self.buckets or [1]), dtype=torch.int64))
        self.graphs, self.outputs = {}, {}
        self.capture_seconds, self.capture_errors = 0.0, []
        self.done = torch.cuda.Event() if self.graphed else None

    def _pinned(self, t):
        return t.pin_memory() if self.graphed else t

    def padding(self, b):
        """A bucket's inputs with every row padding: token 0 at position 0, sampled on the padding row."""
        inputs = torch.zeros(4, b, dtype=torch.int64, device=self.device)
        inputs[2] = self.padding_row
        return inputs

    @torch.inference_mode()
    def capture(self):
        """One graph per bucket, largest first (the smaller ones reuse its memory pool). A bucket that fails
        to capture is dropped: those steps run eagerly, slower and still correct."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for b in sorted(self.buckets, reverse=True):
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm up: Triton compiles, cuBLAS picks its kernels
                    self.fn(self.inputs[b], self.masks[b])
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[b] = self.fn(self.inputs[b], self.masks[b])
                self.graphs[b] = graph
            except RuntimeError as e:
                log.warning("CUDA graph of %d rows not captured (%s): those steps run eagerly", b, e)
                self.capture_errors.append(f"{b} rows: {e}")
                torch.cuda.synchronize()
        self.buckets = sorted(self.graphs)
        self.capture_seconds = time.perf_counter() - started
        log.info("CUDA graphs: %d decode buckets (%s) captured in %.1f s", len(self.buckets),
                 ", ".join(map(str, self.buckets)), self.capture_seconds)

    def bucket(self, n):
        return bucket_for(n, self.buckets)

    def run(self, rows, b, masks=None):
        """rows: [tokens, positions, sampler rows, steps] of n <= b rows; masks: None (every row free) or their
        masks [n, words] on the host (pinned) -> (ids as a list, logits [n, vocab])."""
        n = len(rows[0])
        host = self.host_in[b]  # pinned; free again once the previous step's copy was waited for
        host[:, n:] = 0
        host[2, n:] = self.padding_row
        host[:, :n] = torch.tensor(rows)
        self.inputs[b].copy_(host, non_blocking=True)
        if masks is not None:  # a step with no constrained row copies nothing, once the bits are cleared
            self.masks[b][:n].copy_(masks, non_blocking=True)
            self.masks[b][n:].fill_(-1)
            self.masked.add(b)
        elif b in self.masked:
            self.masks[b].fill_(-1)
            self.masked.discard(b)
        if self.graphed:
            self.graphs[b].replay()
            ids, logits = self.outputs[b]
            self.host_out[:b].copy_(ids, non_blocking=True)
            self.done.record()
            self.done.synchronize()
        else:
            ids, logits = self.fn(self.inputs[b], self.masks[b])
            self.host_out[:b] = ids
        return self.host_out[:n].tolist(), logits[:n]
