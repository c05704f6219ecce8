"""The paged KV cache: one pool of fixed-size blocks, allocated once, shared by every running request.

A request holds a block table (the blocks of its positions, in order). At admission it reserves
every block its prompt plus max_new_tokens can need, so nothing is ever evicted mid-answer; it takes
them from the pool as it grows and gives them back when it ends.

Prefix reuse: a full block of prompt positions is registered under the hash of every prompt token
up to its end. A later prompt that starts with the same tokens takes those blocks instead of
computing them (shared, reference-counted). A registered block nobody holds stays cached until the
pool needs it (least recently used first).
"""

import hashlib
import logging
from collections import OrderedDict

import torch

log = logging.getLogger("llama_pkg")


class KVCache:
    """Keys and values of every layer: [blocks * block_size, kv_heads, head_dim] each, one slot per position."""

    def __init__(self, config, blocks, block_size, device, dtype):
        shape = (blocks * block_size, config.kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.layers)]

    def layer(self, i):
        return self.keys[i], self.values[i]

    @staticmethod
    def bytes_per_token(config, dtype):
        return 2 * config.layers * config.kv_heads * config.head_dim * torch.finfo(dtype).bits // 8


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
        return -(-tokens // self.block_size)

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
        for block in table:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)

    def all_free(self):
        """Every block free or idle, nothing reserved: what the pool looks like with no request in it."""
        return self.reserved == 0 and len(self.free) + len(self.idle) == self.blocks and not any(self.refs)
