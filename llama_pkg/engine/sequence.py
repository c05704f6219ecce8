"""One request inside the engine: its ids and settings, its blocks, how far it has been computed, and
the chunk the scheduler planned for the current step. Tokens leave through `out`, then END or an error.
A constrained request (json_schema) carries its grammar matcher: it masks each draw and sees each id."""

import queue
import threading

END = object()


class Sequence:
    def __init__(self, prompt_ids, max_new_tokens, params, stop_ids, cancel=None, constraint=None):
        self.prompt, self.max_new, self.params, self.stop_ids = list(prompt_ids), max_new_tokens, params, stop_ids
        self.constraint = constraint
        self.cancel = cancel or threading.Event()
        self.out = queue.SimpleQueue()
        self.queued = None  # while it waits: (place in the queue, why), set by the scheduler
        self.overtaken = 0  # later requests started before it while it did not fit
        self.row = None  # the sampler row it holds while running
        self.block_table = []  # its blocks, in position order
        self.reserved = 0  # blocks reserved at admission, not yet taken
        self.hashes = []  # the prefix hash of each full prompt block
        self.registered = 0  # prompt blocks registered for prefix reuse
        self.computed = 0  # positions whose keys and values are in the cache
        self.generated = 0
        self.last = None  # the last sampled id, fed in the next decode step
        # this step's chunk, set by the scheduler: positions start..start+count-1; samples: its last row draws
        self.start, self.count, self.samples = 0, 0, False

    @property
    def prefilling(self):
        return self.computed < len(self.prompt)

    def chunk_ids(self):
        """The ids fed for this step's chunk: prompt ids, or the last sampled one."""
        return self.prompt[self.start:self.start + self.count] if self.prefilling else [self.last]
