"""Continuous batching, without torch: which requests run, and what each computes in the next step. Each
step every generating request adds a decode row, and requests being prefilled add prompt chunks (cut at
multiples of `chunk`, never split, so their bounds do not depend on other requests). A request waits
until the pool holds its prompt plus max_new_tokens and a row is free: in arrival order, except that
one that fits may pass an older one that does not, at most OVERTAKES times.
"""

from collections import deque

from .block_manager import block_hashes
from .sequence import END

OVERTAKES = 8  # how many later requests may start before an older one that does not fit yet


class Scheduler:
    def __init__(self, pool, max_batch, chunk):
        self.pool, self.max_batch, self.chunk = pool, max_batch, chunk
        self.free_rows = list(range(max_batch - 1, -1, -1))
        self.waiting, self.running = deque(), []
        self.stats = {"prefix_tokens_reused": 0, "max_running": 0}

    def add(self, seq):
        self.waiting.append(seq)

    def drop_cancelled(self):
        for s in [s for s in self.waiting if s.cancel.is_set()]:
            self.waiting.remove(s)
            s.out.put(END)
        for s in [s for s in self.running if s.cancel.is_set()]:
            self.finish(s)

    def admit(self):
        """Waiting requests that now fit: they hold a sampler row and their blocks are reserved; their
        cached prefix counts as computed. Those left waiting are told why and their place."""
        admitted, unfit, bs = [], {}, self.pool.block_size  # unfit: the blocks each that does not fit needs
        for s in list(self.waiting):
            blocked = next(iter(unfit), None)  # the oldest that does not fit
            if not self.free_rows or (blocked is not None and blocked.overtaken >= OVERTAKES):
                break
            if not s.hashes:
                s.hashes = block_hashes(s.prompt, bs, len(s.prompt) // bs)
            total = len(s.prompt) + s.max_new
            # at least one prompt position is always computed: its logits give the first token
            prefix = self.pool.admit(s.hashes[:(len(s.prompt) - 1) // bs], total)
            if prefix is None:
                unfit[s] = self.pool.blocks_for(total)
                continue
            if blocked is not None:
                blocked.overtaken += 1
            self.waiting.remove(s)
            s.queued, s.row = None, self.free_rows.pop()
            s.block_table, s.reserved = list(prefix), self.pool.blocks_for(total) - len(prefix)
            s.computed, s.registered = len(prefix) * bs, len(prefix)
            self.running.append(s)
            self.stats["prefix_tokens_reused"] += s.computed
            admitted.append(s)
        self.stats["max_running"] = max(self.stats["max_running"], len(self.running))
        for place, s in enumerate(self.waiting, 1):
            if s in unfit:
                why = (f"the KV cache has {self.pool.available()} free blocks of {bs} positions, its prompt and "
                       f"max_tokens need {unfit[s]}")
            elif not self.free_rows:
                why = f"all {self.max_batch} of the engine's rows are generating"
            else:
                why = "an older request that does not fit yet goes first"
            s.queued = (place, why)
        return admitted

    def schedule(self):
        """This step's sequences, decode rows first, then prompt chunks; each with its chunk set and the
        blocks it writes taken from its reservation."""
        seqs = [s for s in self.running if not s.prefilling]
        for s in seqs:
            s.start, s.count, s.samples = s.computed, 1, True
        budget = self.chunk
        for s in self.running:
            if budget <= 0:
                break
            if s.prefilling:
                end = min((s.computed // self.chunk + 1) * self.chunk, len(s.prompt))
                if end - s.computed > budget:
                    break  # a chunk is never split, so its bounds do not depend on other requests
                s.start, s.count, s.samples = s.computed, end - s.computed, end == len(s.prompt)
                seqs.append(s)
                budget -= s.count
        for s in seqs:
            while len(s.block_table) * self.pool.block_size < s.start + s.count:
                s.block_table.append(self.pool.take())
                s.reserved -= 1
        return seqs

    def postprocess(self, seqs, ids):
        """The step computed `seqs`' chunks and drew `ids` for those that sample: register full prompt
        blocks for reuse, hand out the tokens, finish what is done."""
        bs = self.pool.block_size
        for s in seqs:
            s.computed = s.start + s.count
            while s.registered < len(s.hashes) and (s.registered + 1) * bs <= s.computed:
                self.pool.register(s.block_table[s.registered], s.hashes[s.registered])
                s.registered += 1
        for s, token in zip([s for s in seqs if s.samples], ids):
            s.generated += 1
            s.last = token
            c = s.constraint
            if c is not None and token not in s.stop_ids and not c.consume(token):
                self.finish(s, RuntimeError(f"json_schema: the grammar refused token {token}: {c.error}"))
                continue
            s.out.put(token)
            # a complete document (nothing but a stop id may follow) ends the answer without another step
            if token in s.stop_ids or s.generated >= s.max_new or (c is not None and c.done):
                self.finish(s)

    def finish(self, seq, error=None):
        if seq in self.running:
            self.running.remove(seq)
            self.pool.release(seq.block_table, seq.reserved)
            seq.block_table, seq.reserved = [], 0
            self.free_rows.append(seq.row)
        seq.out.put(error if error is not None else END)
