"""The paged KV cache's bookkeeping (no torch): a pool of fixed-size blocks shared by every request.
A request reserves at admission every block its prompt plus max_new_tokens can need (nothing is evicted
mid-answer), takes them as it grows, and gives them back when it ends. Full prompt blocks are registered
under the hash of every token up to their end, so a later prompt with the same prefix reuses them.
"""

import hashlib
from collections import OrderedDict

from .. import cdiv


def block_hashes(ids, block_size, blocks):
    """The chained hash of each of the first `blocks` full blocks of ids: block i's hash covers ids[:(i+1)*bs]."""
    out, h = [], hashlib.sha256()
    for i in range(blocks):
        h.update(b"".join(int(t).to_bytes(4, "little") for t in ids[i * block_size:(i + 1) * block_size]))
        out.append(h.copy().digest())
    return out


class BlockPool:
    def __init__(self, blocks, block_size):
        self.blocks, self.block_size = blocks, block_size
        self.free = list(range(blocks - 1, -1, -1))
        self.refs = [0] * blocks
        self.hash_of = {}  # block -> prefix hash, for registered blocks
        self.by_hash = {}  # prefix hash -> block
        self.idle = OrderedDict()  # registered blocks nobody holds, least recently used first
        self.reserved = 0  # blocks promised to admitted requests and not yet taken

    def available(self):
        return len(self.free) + len(self.idle) - self.reserved

    def blocks_for(self, tokens):
        return cdiv(tokens, self.block_size)

    def cached_prefix(self, hashes):
        """Registered blocks that hold a prompt's prefix, in order, from its blocks' hashes."""
        found = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def admit(self, prefix_hashes, total_tokens):
        """Reserve what a request of `total_tokens` positions needs, reusing the cached blocks of its
        prefix (given as block hashes): the prefix blocks (now held), or None when the pool cannot
        hold it yet."""
        prefix = self.cached_prefix(prefix_hashes)
        need = self.blocks_for(total_tokens) - len(prefix)
        idle_reused = sum(b in self.idle for b in prefix)
        if need > self.available() - idle_reused:
            return None
        for b in prefix:
            self.idle.pop(b, None)
            self.refs[b] += 1
        self.reserved += need
        return prefix

    def take(self):
        """One reserved block for a growing request (a free one, else the least recently used idle one)."""
        self.reserved -= 1
        if self.free:
            block = self.free.pop()
        else:
            block, _ = self.idle.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
        self.refs[block] = 1
        return block

    def register(self, block, prefix_hash):
        """A full block of prompt positions, computed: later prompts with the same prefix may reuse it."""
        if prefix_hash not in self.by_hash and block not in self.hash_of:
            self.by_hash[prefix_hash] = block
            self.hash_of[block] = prefix_hash

    def release(self, table, unused_reservation):
        """A request ended: its blocks go back (registered ones stay cached), and what it reserved but
        never took is returned."""
        self.reserved -= unused_reservation
        for block in reversed(table):  # free blocks are taken from the end: a table's come back in order
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)

    def all_free(self):
        """Every block free or idle, nothing reserved: what the pool looks like with no request in it."""
        return self.reserved == 0 and len(self.free) + len(self.idle) == self.blocks and not any(self.refs)
