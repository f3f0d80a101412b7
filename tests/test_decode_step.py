"""The fused decode step (``qk_decode_step``: every decoder layer of a step in one native call) gives
the module path's bits: hidden states and the keys/values it stores, for fp32 and bf16, one or several
rows over caches of different lengths, text and M-RoPE positions, on every ISA this machine runs."""

from __future__ import annotations

import pytest
import torch
from gguf_fixtures import write_tiny_gguf

import qwenvl
from qwenvl import defaults, ops
from qwenvl.engine.kv_cache import KVPool


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    """Tiny GGUFs (mixed block formats: q/k/v and gate/up of different formats side by side)."""
    directory = tmp_path_factory.mktemp("decode_step")
    paths = {}
    for arch in ("qwen2", "qwen2vl"):
        paths[arch] = directory / f"{arch}.gguf"
        write_tiny_gguf(paths[arch], arch=arch)
    return paths


def _positions(starts: list[int], mrope: bool, step: int) -> torch.Tensor:
    """Position ids [3, B, 1]: text positions, or three different M-RoPE sections (as after an image)."""
    base = torch.tensor(starts)[None, :, None].expand(3, len(starts), 1).clone()
    if mrope:
        base = base + torch.tensor([5, -3, 11])[:, None, None] * (step + 1)
    return base


def _decode(model: qwenvl.api.Model, lengths: list[int], steps: int, mrope: bool) -> tuple[list, list]:
    """Hidden states of ``steps`` decode steps for requests with prompts of ``lengths`` tokens (each
    prefilled alone), and each request's keys and values afterwards (per layer)."""
    text = model.text_model
    pool = KVPool(text.config, text.dtype, 8 << 20)
    caches = []
    with torch.inference_mode():
        for row, length in enumerate(lengths):
            cache = pool.sequence()
            ids = torch.arange(3 + row, 3 + row + length)[None] % text.config.vocab_size
            text(text.embed(ids), torch.arange(length).expand(3, 1, length).clone(), cache, start=0)
            caches.append(cache)
        outputs = []
        for step in range(steps):
            starts = [length + step for length in lengths]
            ids = torch.tensor([[(7 * row + step) % text.config.vocab_size] for row in range(len(lengths))])
            positions = _positions(starts, mrope, step)
            if len(lengths) == 1:  # a single request's step: the forward call the generation loop makes
                outputs.append(text(text.embed(ids), positions, caches[0], start=starts[0]))
            else:
                outputs.append(text.decode(text.embed(ids), positions, caches, starts))
        stored = [torch.stack(c.gather(layer, c.length)) for c in caches for layer in range(len(text.layers))]
    return outputs, stored


def _module_path(monkeypatch) -> None:
    monkeypatch.setattr(ops, "decode_layers", lambda *args: None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["qwen2", "qwen2vl"])
@pytest.mark.parametrize("lengths", [[9], [3, 17, 40]])
def test_fused_step_equals_the_module_path(tiny_ggufs, native_isa, monkeypatch, dtype, arch, lengths):
    model = qwenvl.load(str(tiny_ggufs[arch]), dtype=dtype)
    assert model.text_model.decoder_step() is not None  # the fused step applies to these layers
    fused, fused_cache = _decode(model, lengths, 3, mrope=arch == "qwen2vl")
    _module_path(monkeypatch)
    modules, module_cache = _decode(model, lengths, 3, mrope=arch == "qwen2vl")
    for a, b in zip(fused, modules):
        assert a.dtype == b.dtype == getattr(torch, dtype)
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(fused_cache, module_cache))


@pytest.mark.parametrize("arch", ["qwen2", "qwen2vl"])
def test_fused_step_with_int8_activations_equals_the_module_path(tiny_ggufs, native_isa, monkeypatch, arch):
    """--kernel q8: the fused step multiplies with the q8 GEMV, as the layers' own calls do."""
    model = qwenvl.load(str(tiny_ggufs[arch]), dtype="float32", kernel="q8")
    assert any(w.q8 for layer in model.text_model.decoder_step().weights for w in [*layer.qkv, *layer.down])
    fused, fused_cache = _decode(model, [3, 17], 3, mrope=arch == "qwen2vl")
    _module_path(monkeypatch)
    modules, module_cache = _decode(model, [3, 17], 3, mrope=arch == "qwen2vl")
    assert all(torch.equal(a, b) for a, b in zip(fused, modules))
    assert all(torch.equal(a, b) for a, b in zip(fused_cache, module_cache))


def test_dense_layers_take_the_module_path(tiny_ggufs):
    """Linear layers that are not block GEMVs (torch's dense matmul) have no fused step."""
    model = qwenvl.load(str(tiny_ggufs["qwen2"]), kernel="dense")
    assert model.text_model.decoder_step() is None
    outputs, _ = _decode(model, [4, 6], 1, mrope=False)
    assert outputs[0].shape == (2, 1, model.text_model.config.hidden_size)


def test_logn_queries_and_long_batches_take_the_module_path(tiny_ggufs):
    """The fused step declines logn-scaled queries and more rows than its GEMVs take."""
    model = qwenvl.load(str(tiny_ggufs["qwen2"]))
    text = model.text_model
    step = text.decoder_step()
    pool = KVPool(text.config, text.dtype, 8 << 20)
    caches = [pool.sequence() for _ in range(step.max_rows + 1)]
    for cache in caches:
        cache.prepare_write(0, 1)
    attention = ops.paged_decode_attention(
        pool.keys, pool.values, [c.table for c in caches], [0] * len(caches), text.dtype
    )
    x = torch.zeros(len(caches), 1, text.config.hidden_size)
    cos = torch.ones(len(caches), 1, 1, text.config.head_dim)
    sin = torch.zeros(len(caches), 1, 1, text.config.head_dim)
    assert ops.decode_layers(step, x, cos, sin, attention, None) is None  # 17 rows: the GEMM's
    few = ops.paged_decode_attention(pool.keys, pool.values, [caches[0].table], [0], text.dtype)
    assert ops.decode_layers(step, x[:1], cos[:1], sin[:1], few, torch.ones(1, 1, 1, 1)) is None
    assert ops.decode_layers(step, x[:1], cos[:1], sin[:1], few, None) is not None


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_step_equals_the_module_path_on_the_real_gguf(monkeypatch, dtype):
    model = qwenvl.load(defaults.default_gguf_path(), dtype=dtype)
    assert model.text_model.decoder_step() is not None
    fused, fused_cache = _decode(model, [5, 12, 30], 2, mrope=False)
    _module_path(monkeypatch)
    modules, module_cache = _decode(model, [5, 12, 30], 2, mrope=False)
    assert all(torch.equal(a, b) for a, b in zip(fused, modules))
    assert all(torch.equal(a, b) for a, b in zip(fused_cache, module_cache))
