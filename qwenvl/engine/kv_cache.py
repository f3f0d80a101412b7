"""The engine's KV cache: fixed-size blocks in one pool, shared between requests by prefix.

A request's keys/values live in blocks of ``BLOCK_SIZE`` tokens (all layers and heads of those
tokens in one block), listed in its block table (``BlockSequence``). Attention reads them through the
table: the native decode kernel where they lie, the prefill path by gathering the request's blocks.

Prefix caching: each full block of a prompt is named by a hash chained over everything that
determines its keys and values (``block_hashes``): the previous block's hash, the block's token ids,
its M-RoPE positions and, for image/video pad tokens, the digest of that item's preprocessed pixels
and grid (each item keyed on its own). A new request takes the longest chain of cached blocks that
matches its prompt and prefills only the rest. Blocks are reference-counted; a block nobody uses
stays cached until the pool needs it (least recently used first).

The API (what the generation code, the batching engine and speculative decoding use):

- ``KVPool(config, dtype, budget_bytes)``: the blocks; ``pool.sequence(hashes)`` a request's cache,
  its prefix matched; ``pool.stats()``.
- ``BlockSequence``: ``prepare_write(start, n)`` before a forward writes positions start … start+n
  (allocates blocks, copies a shared block before writing it: copy-on-write), ``register(tokens)``
  after the prompt's first ``tokens`` are in, ``truncate(length)`` to roll back (a shared block is
  never modified), ``fork()`` for another choice of the same prompt, ``release()`` at the end.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..config import TextConfig
from ..errors import QwenVLError

BLOCK_SIZE = 16  # tokens per block
DEFAULT_SHARE = 0.25  # of the memory available at start-up, when no budget is given


class KVCacheFull(QwenVLError):
    """No free block: every block is held by a running request."""


def block_hashes(
    input_ids: Sequence[int],
    position_ids: torch.Tensor,
    visual_items: Sequence[tuple[str, int]] = (),
    visual_token_ids: Sequence[int] = (),
    seed: str = "",
    block_size: int = BLOCK_SIZE,
) -> list[bytes]:
    """The chained hash of each full block of a prompt: ids [L], M-RoPE positions [3, L], and
    ``visual_items`` (each image/video's digest and pad-token count, in prompt order) for the pad
    tokens in ``visual_token_ids``. ``seed``: whatever else changes the keys (the rope factor)."""
    ids = torch.tensor(list(input_ids), dtype=torch.int64)
    owner = torch.full((len(ids),), -1, dtype=torch.int64)  # item index of each pad token
    if visual_items:
        pads = torch.isin(ids, torch.tensor(list(visual_token_ids), dtype=torch.int64))
        counts = torch.tensor([count for _, count in visual_items])
        if int(pads.sum()) != int(counts.sum()):
            raise ValueError("the visual items do not account for the prompt's pad tokens")
        owner[pads] = torch.repeat_interleave(torch.arange(len(visual_items)), counts)
    positions = position_ids.to(torch.int64).contiguous()
    hashes, previous = [], hashlib.blake2b(seed.encode(), digest_size=16).digest()
    for start in range(0, len(ids) - block_size + 1, block_size):
        end = start + block_size
        digest = hashlib.blake2b(previous, digest_size=16)
        digest.update(ids[start:end].numpy().tobytes())
        digest.update(positions[:, start:end].contiguous().numpy().tobytes())
        for item in owner[start:end].unique().tolist():
            if item >= 0:
                digest.update(visual_items[item][0].encode())
        previous = digest.digest()
        hashes.append(previous)
    return hashes


def default_budget_bytes() -> int:
    """``DEFAULT_SHARE`` of the memory available now (MemAvailable), at least 64 MiB."""
    available = 0
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if not available:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return max(64 << 20, int(available * DEFAULT_SHARE))


class KVPool:
    """Keys and values of ``num_blocks`` blocks: [blocks, layers, kv_heads, block_size, head_dim] each.

    Left uninitialized: the pages of a block are touched when a request first writes it. Thread-safe
    (the batching engine and direct ``Model.chat`` calls may share it).
    """

    def __init__(
        self,
        cfg: TextConfig,
        dtype: torch.dtype,
        budget_bytes: int,
        block_size: int = BLOCK_SIZE,
        prefix_caching: bool = True,
    ):
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, block_size, cfg.head_dim)
        per_block = 2 * torch.Size(shape).numel() * dtype.itemsize
        self.num_blocks = max(1, budget_bytes // per_block)
        self.block_size, self.block_bytes = block_size, per_block
        self.prefix_caching = prefix_caching
        self.keys = torch.empty(self.num_blocks, *shape, dtype=dtype)
        self.values = torch.empty(self.num_blocks, *shape, dtype=dtype)
        self.refs = [0] * self.num_blocks
        self.free = list(range(self.num_blocks - 1, -1, -1))  # never used or emptied; pop() gives 0 first
        self.cached: OrderedDict[int, None] = OrderedDict()  # registered, unused: least recently used first
        self.block_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.lock = threading.Lock()
        self.queried_tokens = self.hit_tokens = 0

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def describe(self) -> str:
        """One line for start-up: the budget and whether prefixes are reused."""
        mib = self.nbytes / 2**20
        reuse = "prefix caching on" if self.prefix_caching else "prefix caching off"
        return f"KV cache {mib:.0f} MiB ({self.num_blocks} blocks of {self.block_size} tokens), {reuse}"

    def stats(self) -> dict[str, int]:
        with self.lock:
            used = sum(1 for refs in self.refs if refs)
            return {
                "blocks": self.num_blocks,
                "blocks_used": used,
                "blocks_cached": len(self.cached),
                "prefix_queried_tokens": self.queried_tokens,
                "prefix_hit_tokens": self.hit_tokens,
            }

    def clear_prefixes(self) -> int:
        """Forget every cached prefix (the next requests prefill their whole prompts; running requests
        keep their blocks, which go back to the free list when released). Returns the blocks forgotten."""
        with self.lock:
            forgotten = len(self.hash_of)
            self.free.extend(self.cached)
            self.cached.clear()
            self.block_of.clear()
            self.hash_of.clear()
            return forgotten

    def available(self) -> int:
        """Blocks a new request can get (free, or cached and unused)."""
        with self.lock:
            return len(self.free) + len(self.cached)

    def sequence(self, hashes: Sequence[bytes] = (), reuse_limit: int = 0) -> BlockSequence:
        """A request's cache whose first blocks are the longest cached chain matching ``hashes`` (the
        prompt's full blocks), at most ``reuse_limit`` tokens of it (so the prompt's last token is
        always prefilled: its logits are needed)."""
        blocks = self._match(hashes, reuse_limit // self.block_size) if self.prefix_caching else []
        with self.lock:
            self.queried_tokens += reuse_limit
            self.hit_tokens += len(blocks) * self.block_size
        return BlockSequence(self, blocks, list(hashes), len(blocks) * self.block_size)

    def cached_prefix(self, hashes: Sequence[bytes]) -> int:
        """How many of ``hashes`` (a prompt's, in order) name blocks the pool holds now, from the first."""
        with self.lock:
            count = 0
            while count < len(hashes) and hashes[count] in self.block_of:
                count += 1
            return count

    # -- blocks (callers hold no lock) ---------------------------------------------------------
    def _match(self, hashes: Sequence[bytes], limit: int) -> list[int]:
        blocks = []
        with self.lock:
            for digest in hashes[:limit]:
                block = self.block_of.get(digest)
                if block is None:
                    break
                if self.refs[block] == 0:
                    del self.cached[block]
                self.refs[block] += 1
                blocks.append(block)
        return blocks

    def _allocate(self) -> int:
        with self.lock:
            if self.free:
                block = self.free.pop()
            elif self.cached:
                block, _ = self.cached.popitem(last=False)
                del self.block_of[self.hash_of.pop(block)]
            else:
                raise KVCacheFull(
                    f"the KV cache is full ({self.nbytes / 2**20:.0f} MiB in use by running requests); "
                    "raise --kv-cache-mb or send fewer tokens at once"
                )
            self.refs[block] = 1
            return block

    def _release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block, the last ones first (so a chain's tail is evicted first)."""
        with self.lock:
            for block in reversed(blocks):
                self.refs[block] -= 1
                if self.refs[block] == 0:
                    if block in self.hash_of:
                        self.cached[block] = None
                    else:
                        self.free.append(block)

    def _share(self, blocks: Sequence[int]) -> None:
        with self.lock:
            for block in blocks:
                self.refs[block] += 1

    def _register(self, block: int, digest: bytes) -> None:
        with self.lock:
            if digest not in self.block_of and block not in self.hash_of:
                self.block_of[digest], self.hash_of[block] = block, digest

    def _writable(self, block: int) -> bool:
        with self.lock:
            return self.refs[block] == 1 and block not in self.hash_of


class BlockSequence:
    """One request's KV cache: its block table over a ``KVPool``. ``cached_tokens``: the prompt tokens
    found in the cache when it was made (prefill starts there)."""

    def __init__(self, pool: KVPool, blocks: list[int], hashes: list[bytes], cached_tokens: int):
        self.pool, self.blocks, self.hashes = pool, blocks, hashes
        self.cached_tokens = cached_tokens
        self.length = cached_tokens  # positions 0 … length-1 hold keys/values
        self.registered = len(blocks)  # the first blocks are the pool's under their hashes
        self.table = torch.tensor(blocks, dtype=torch.int64)

    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.pool.block_bytes

    def prepare_write(self, start: int, count: int) -> None:
        """Make positions start … start+count writable: allocate blocks up to there and copy any block
        in the range that is shared (another request's, or cached under its hash) to a block of its
        own first. KVCacheFull if the pool has no block left."""
        if start > self.length:
            raise ValueError(f"KV cache: writing at {start} leaves a gap after {self.length}")
        size, end = self.pool.block_size, start + count
        changed = False
        for index in range(start // size, -(-end // size)):
            if index == len(self.blocks):
                self.blocks.append(self.pool._allocate())
                changed = True
            elif not self.pool._writable(self.blocks[index]):
                self._copy_on_write(index)
                changed = True
        if changed:
            self.table = torch.tensor(self.blocks, dtype=torch.int64)
        self.length = end

    def _copy_on_write(self, index: int) -> None:
        pool, shared = self.pool, self.blocks[index]
        block = pool._allocate()
        pool.keys[block] = pool.keys[shared]
        pool.values[block] = pool.values[shared]
        self.blocks[index] = block
        self.registered = min(self.registered, index)
        pool._release([shared])

    def register(self, tokens: int) -> None:
        """Offer the prompt's full blocks among the first ``tokens`` positions to later requests."""
        if not self.pool.prefix_caching:
            return
        full = min(tokens // self.pool.block_size, len(self.hashes), len(self.blocks))
        for index in range(self.registered, full):
            self.pool._register(self.blocks[index], self.hashes[index])
        self.registered = max(self.registered, full)

    def truncate(self, length: int) -> None:
        """Keep positions 0 … length-1 only (speculative decoding's rollback): blocks past them go
        back to the pool; a kept block that is shared is copied before it is next written."""
        if length < 0 or length > self.length:
            raise ValueError(f"KV cache: cannot truncate {self.length} positions to {length}")
        keep = -(-length // self.pool.block_size)
        dropped, self.blocks = self.blocks[keep:], self.blocks[:keep]
        self.pool._release(dropped)
        self.table = torch.tensor(self.blocks, dtype=torch.int64)
        self.length = length
        self.registered = min(self.registered, length // self.pool.block_size)
        self.hashes = self.hashes[: length // self.pool.block_size]

    def fork(self) -> BlockSequence:
        """Another request's cache holding the same positions, sharing every block (each copies a
        shared block before writing it)."""
        self.pool._share(self.blocks)
        twin = BlockSequence(self.pool, list(self.blocks), list(self.hashes), self.cached_tokens)
        twin.length, twin.registered = self.length, self.registered
        return twin

    def release(self) -> None:
        """Give the blocks back (cached ones stay findable until evicted). Idempotent."""
        blocks, self.blocks = self.blocks, []
        self.pool._release(blocks)
        self.table = torch.tensor([], dtype=torch.int64)
        self.length = 0

    # -- attention -------------------------------------------------------------------------------
    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values [kv_heads, L, head_dim] of positions start … start+L (made writable)."""
        positions = torch.arange(start, start + k.shape[1])
        blocks = self.table[positions // self.pool.block_size]
        offsets = positions % self.pool.block_size
        self.pool.keys[blocks, layer, :, offsets] = k.transpose(0, 1)
        self.pool.values[blocks, layer, :, offsets] = v.transpose(0, 1)

    def gather(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [kv_heads, end, head_dim] of positions 0 … end-1 (a copy)."""
        count = -(-end // self.pool.block_size)
        table = self.table[:count]
        keys = self.pool.keys[table, layer].transpose(0, 1).flatten(1, 2)[:, :end]
        values = self.pool.values[table, layer].transpose(0, 1).flatten(1, 2)[:, :end]
        return keys, values

    def view(self, layer: int, start: int, length: int, mask: torch.Tensor | None) -> BlockKVView:
        return BlockKVView(self, layer, start, length, mask)


class BlockKVView:
    """One layer's slice of a request's cache for one forward call: positions start … start+L are
    written, attention covers 0 … start+L (``mask``: the chunk's causal mask, None for one token or
    a chunk starting at 0)."""

    def __init__(self, seq: BlockSequence, layer: int, start: int, length: int, mask: torch.Tensor | None):
        self.seq, self.layer, self.start, self.length, self.mask = seq, layer, start, length, mask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of q [1, heads, L, head_dim] over the cache with this call's k, v [1, kv_heads, L, D] stored."""
        seq, pool = self.seq, self.seq.pool
        if q.shape[2] == 1 and q.shape[0] == 1:
            kernel = ops.paged_decode_attention(pool.keys, pool.values, [seq.table], [self.start], q.dtype)
            if kernel is not None:
                return kernel(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.layer).unsqueeze(2)
        seq.write(self.layer, self.start, k[0], v[0])
        if self.start == 0:
            keys, values = k, v
        else:
            keys, values = (t[None] for t in seq.gather(self.layer, self.start + self.length))
        causal = self.mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, is_causal=causal, enable_gqa=True)


class RowsKVView:
    """One layer's caches for a batched decode step: row i of the batch is a request of its own,
    with its own cache and position. Attention runs per row (in one kernel call for all rows, or one
    SDPA call per row without the kernels), exactly as a single-request step runs it, so each row's
    result does not depend on the others."""

    def __init__(
        self, caches: Sequence[BlockSequence], starts: Sequence[int], layer: int, kernel: ops.DecodeAttention | None
    ):
        self.caches, self.starts, self.layer, self.kernel = caches, starts, layer, kernel

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.layer).unsqueeze(2)
        views = [cache.view(self.layer, start, 1, None) for cache, start in zip(self.caches, self.starts)]
        return torch.cat([view.attend(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i, view in enumerate(views)])


def decode_kernel(caches: Sequence[BlockSequence], starts: Sequence[int], dtype: torch.dtype):
    """The native attention of one decode step over these requests' caches (one pool), or None."""
    pool = caches[0].pool
    return ops.paged_decode_attention(pool.keys, pool.values, [c.table for c in caches], starts, dtype)


class SegmentsKVView:
    """One layer's caches for several requests' prompt chunks packed into one sequence [1, N]:
    consecutive segments of the N tokens belong to different requests. The projections see all N
    rows; attention runs per segment, on its own cache, as the request's own prefill would."""

    def __init__(self, views: Sequence[BlockKVView], lengths: Sequence[int]):
        self.views, self.lengths = views, list(lengths)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pieces = zip(self.views, q.split(self.lengths, 2), k.split(self.lengths, 2), v.split(self.lengths, 2))
        return torch.cat([view.attend(*qkv) for view, *qkv in pieces], dim=2)
