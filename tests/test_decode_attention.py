"""The compiled decode attention: SDPA's result, each row independent of the batch, keys/values stored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenvl.engine.kv_cache import KVPool, RowsKVView, decode_kernel


def caches_and_step(rows, heads, kv_heads, dim, dtype, layers=3, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    capacities = [40 + 13 * i for i in range(rows)]
    positions = [0] + [5 + 11 * i for i in range(1, rows)]  # row 0 attends to its new key only
    keys = [randn(layers, kv_heads, c, dim) for c in capacities]
    values = [randn(layers, kv_heads, c, dim) for c in capacities]
    q, k, v = randn(rows, heads, dim), randn(rows, kv_heads, dim), randn(rows, kv_heads, dim)
    return keys, values, positions, q, k, v


def reference(keys, values, positions, q, k, v, layer):
    """Per row: SDPA in fp64 over the cache with the new key/value in place."""
    out = []
    for i, position in enumerate(positions):
        K, V = keys[i][layer].clone(), values[i][layer].clone()
        K[:, position], V[:, position] = k[i], v[i]
        K, V = K[None, :, : position + 1].double(), V[None, :, : position + 1].double()
        out.append(F.scaled_dot_product_attention(q[i : i + 1, :, None].double(), K, V, enable_gqa=True)[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(14, 2, 64), (12, 2, 128), (4, 4, 16), (4, 2, 20), (6, 3, 12)],  # vector paths (64, 128) and the generic one
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_sdpa_and_stores_the_new_key(native_isa, heads, kv_heads, dim, dtype):
    keys, values, positions, q, k, v = caches_and_step(5, heads, kv_heads, dim, dtype)
    want = reference(keys, values, positions, q, k, v, layer=1)
    got = native_isa.decode_attention(keys, values, positions)(q, k, v, layer=1)
    assert got.dtype == dtype and got.shape == (5, heads, dim)
    tolerance = 2e-6 if dtype == torch.float32 else 8e-3  # bf16: the output's rounding
    assert (got.double() - want).abs().max().item() < tolerance
    for i, position in enumerate(positions):
        assert torch.equal(keys[i][1, :, position], k[i]) and torch.equal(values[i][1, :, position], v[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_the_batch(native_isa, dtype):
    keys, values, positions, q, k, v = caches_and_step(7, 14, 2, 64, dtype, seed=3)
    batched = native_isa.decode_attention(keys, values, positions)(q, k, v, layer=2)
    for i in range(7):
        single = native_isa.decode_attention([keys[i]], [values[i]], [positions[i]])
        alone = single(q[i : i + 1], k[i : i + 1], v[i : i + 1], 2)
        assert torch.equal(alone[0], batched[i]), i


def test_strided_rows_as_the_model_passes_them(native_isa):
    """q, k, v are slices of one fused projection (row stride > heads · dim)."""
    keys, values, positions, q, k, v = caches_and_step(3, 4, 2, 16, torch.float32)
    fused = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1), torch.zeros(3, 5)], dim=1)
    qs, ks, vs = fused[:, :64].view(3, 4, 16), fused[:, 64:96].view(3, 2, 16), fused[:, 96:128].view(3, 2, 16)
    want = reference(keys, values, positions, q, k, v, layer=0)
    got = native_isa.decode_attention(keys, values, positions)(qs, ks, vs, layer=0)
    assert (got.double() - want).abs().max().item() < 2e-6


def test_mismatches_are_refused(native_isa):
    keys, values, positions, q, k, v = caches_and_step(2, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="room for the position"):
        native_isa.decode_attention(keys, values, [0, keys[1].shape[2]])
    with pytest.raises(ValueError, match="share a dtype"):
        native_isa.decode_attention([keys[0], keys[1].bfloat16()], values, positions)
    attention = native_isa.decode_attention(keys, values, positions)
    with pytest.raises(ValueError, match="do not match"):
        attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0)
    with pytest.raises(ValueError, match="cannot share"):
        attention(torch.zeros(2, 3, 16), k, v, 0)


def test_model_rows_take_the_kernel_or_sdpa_alike(native_isa):
    """RowsKVView over block tables with the kernel and without it (gathered rows and SDPA, the
    fallback) agree."""
    from qwenvl.config import TextConfig

    config = TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=100)  # fmt: skip
    pool = KVPool(config, torch.float32, 1 << 20, block_size=4)
    pool.keys.normal_(), pool.values.normal_()
    starts = [3, 17, 0]
    caches = [pool.sequence() for _ in starts]
    for cache, start in zip(caches, starts):
        cache.prepare_write(0, start + 1)
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16)
    kernel = decode_kernel(caches, starts, torch.float32)
    assert kernel is not None
    fast = RowsKVView(caches, starts, 1, kernel).attend(q, k, v)
    slow = RowsKVView(caches, starts, 1, None).attend(q, k, v)
    assert fast.shape == slow.shape == (3, 4, 1, 16)
    assert torch.allclose(fast, slow, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_tables_give_the_contiguous_result(native_isa, dtype):
    """Paged caches (scattered, out-of-order blocks) give bit for bit the contiguous caches' result, and
    the new key/value lands in the row's block."""
    keys, values, positions, q, k, v = caches_and_step(4, 14, 2, 64, dtype, seed=5)
    want = native_isa.decode_attention([t.clone() for t in keys], [t.clone() for t in values], positions)(q, k, v, 1)
    size, layers = 16, keys[0].shape[0]
    tables, pool_keys, pool_values, next_block = [], [], [], 0
    for key, value in zip(keys, values):
        count = -(-key.shape[2] // size)
        table = torch.arange(next_block, next_block + count).flip(0)  # blocks in reverse storage order
        next_block += count
        tables.append(table)
        padded = [F.pad(t, (0, 0, 0, count * size - t.shape[2])) for t in (key, value)]
        for store, t in zip((pool_keys, pool_values), padded):
            blocks = t.view(layers, t.shape[1], count, size, t.shape[3]).permute(2, 0, 1, 3, 4)
            store.append(blocks.flip(0))  # block i of the row stored at table[i]
    pool_k, pool_v = torch.cat(pool_keys).contiguous(), torch.cat(pool_values).contiguous()
    got = native_isa.paged_decode_attention(pool_k, pool_v, tables, positions)(q, k, v, 1)
    assert torch.equal(got, want)
    for row, position in enumerate(positions):
        block = tables[row][position // size]
        assert torch.equal(pool_k[block, 1, :, position % size], k[row])
        assert torch.equal(pool_v[block, 1, :, position % size], v[row])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_of_one_sequence_attend_causally_as_one_row_steps(native_isa, dtype):
    """Speculative verification: rows at consecutive positions of one block table (across a block
    boundary) each see the keys up to their own position, the earlier rows' new keys included: bit for
    bit the results and the stored keys/values of one-row steps."""
    generator = torch.Generator().manual_seed(11)
    layers, kv_heads, heads, dim, size, rows, start = 2, 2, 14, 64, 16, 7, 13

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    pool_k, pool_v = randn(4, layers, kv_heads, size, dim), randn(4, layers, kv_heads, size, dim)
    table = torch.tensor([2, 0, 3], dtype=torch.int64)
    q, k, v = randn(rows, heads, dim), randn(rows, kv_heads, dim), randn(rows, kv_heads, dim)
    positions = list(range(start, start + rows))
    got_k, got_v = pool_k.clone(), pool_v.clone()
    got = native_isa.paged_decode_attention(got_k, got_v, [table] * rows, positions)(q, k, v, 1)
    for i, position in enumerate(positions):  # one row a step; positions past it hold stale keys meanwhile
        step = native_isa.paged_decode_attention(pool_k, pool_v, [table], [position])
        assert torch.equal(step(q[i : i + 1], k[i : i + 1], v[i : i + 1], 1)[0], got[i]), i
    assert torch.equal(got_k, pool_k) and torch.equal(got_v, pool_v)
