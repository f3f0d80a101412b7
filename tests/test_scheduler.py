"""The batching engine: concurrent requests give what each gives alone; cancel, errors, validation."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch
from PIL import Image

import qwenvl
from qwenvl.engine.generate import PREFILL_CHUNK
from qwenvl.engine.sampler import Sampler
from qwenvl.engine.scheduler import BatchEngine
from qwenvl.errors import BusyError, RequestError

TEXT_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, tie=False)  # test_text's "untied-gqa2"
VL_SHAPE = dict(arch="qwen2_vl", hidden=64, heads=4, kv_heads=2, ffn=128, mrope_section=[2, 3, 3])  # test_vl's


@pytest.fixture(scope="module")
def model(make_qwen2):
    return qwenvl.load(make_qwen2("untied-gqa2", **TEXT_SHAPE))


@pytest.fixture
def engine(model):
    engine = BatchEngine(model, max_batch=4)
    yield engine
    engine.shutdown()


def random_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [rng.randrange(2, 60) for _ in range(count - 1)] + [PREFILL_CHUNK + 150]  # one prefilled in 2 chunks
    return [[rng.randrange(100, 20000) for _ in range(n)] for n in lengths]


def alone(model: qwenvl.Model, prompt, **sampling):
    generation = model.generate(prompt, **sampling)
    list(generation)
    return generation.result


def first_event(handle):
    return next(iter(handle.events(timeout=60)))


def test_concurrent_greedy_requests_equal_each_alone(model, engine):
    prompts = random_prompts(12)
    options = [dict(temperature=0, max_tokens=random.Random(i).randrange(1, 30)) for i in range(len(prompts))]
    options[3]["ignore_eos"] = True
    expected = [alone(model, p, **o) for p, o in zip(prompts, options)]
    options[5]["stop"] = expected[5].text[3:6] or None  # a stop string met mid-answer
    expected[5] = alone(model, prompts[5], **options[5])

    handles = []
    for group in (range(0, 3), range(3, 7), range(7, 12)):  # staggered: later ones join running ones
        handles += [engine.submit(prompts[i], **options[i]) for i in group]
        first_event(handles[group[0]])
    results = [h.result() for h in handles]
    for index, (want, got) in enumerate(zip(expected, results)):
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason), index
    assert engine.stats()["steps"] < sum(len(r.token_ids) for r in results) - len(results)  # rows shared steps
    stats = engine.stats()
    assert {k: stats[k] for k in ("running", "waiting", "kv_cache_bytes")} == {
        "running": 0,
        "waiting": 0,
        "kv_cache_bytes": 0,
    }
    assert stats["draft_tokens"] == stats["accepted_tokens"] == 0  # no speculation
    assert stats["decode_tokens"] == sum(len(r.token_ids) - 1 for r in results)


def test_waiting_prompts_are_prefilled_together(make_qwen2, monkeypatch):
    """Requests admitted together are prefilled in one packed forward and still answer as alone
    (no prefix cache: each prompt is prefilled whole)."""
    model = qwenvl.load(make_qwen2("untied-gqa2", **TEXT_SHAPE), prefix_cache=False)
    prompts = random_prompts(6, seed=11)  # the last one needs two chunks
    expected = [alone(model, p, temperature=0, max_tokens=8, ignore_eos=True).token_ids for p in prompts]
    calls = []
    forward_segments = model.text_model.forward_segments

    def recording(embeds, positions, caches, starts, lengths, rope_alphas=None):
        calls.append((list(starts), list(lengths)))
        return forward_segments(embeds, positions, caches, starts, lengths, rope_alphas)

    monkeypatch.setattr(model.text_model, "forward_segments", recording)
    engine = BatchEngine(model, max_batch=8)
    monkeypatch.setattr(engine, "start", lambda: None)  # queue everything before the loop runs
    try:
        handles = [engine.submit(p, temperature=0, max_tokens=8, ignore_eos=True) for p in prompts]
        BatchEngine.start(engine)
        assert [h.result().token_ids for h in handles] == expected
    finally:
        engine.shutdown()
    # one forward for all six (budget permitting); the long prompt's second chunk is alone (prefill_chunk)
    assert calls == [([0] * 6, [len(p) for p in prompts[:5]] + [PREFILL_CHUNK])]


def test_events_add_up_to_the_result(model, engine):
    prompt = random_prompts(2, seed=3)[0]
    handle = engine.submit(prompt, temperature=0, max_tokens=12, ignore_eos=True)
    events = list(handle.events(timeout=60))
    result = handle.result()
    assert all(e.finish_reason is None for e in events[:-1]) and events[-1].finish_reason == "length"
    assert "".join(e.text for e in events) == result.text
    assert [t for e in events for t in e.token_ids] == result.token_ids
    assert [e.completion_tokens for e in events] == list(range(1, 13))
    assert {e.prompt_tokens for e in events} == {len(prompt)} == {handle.prompt_tokens}


def test_async_events(model, engine):
    prompt = random_prompts(2, seed=4)[0]

    async def collect(handle):
        return [event async for event in handle.aevents()]

    handles = [engine.submit(prompt, temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 9)]

    async def both():
        return await asyncio.gather(*(collect(h) for h in handles))

    for handle, events in zip(handles, asyncio.run(both())):
        assert events[-1].finish_reason == "length"
        assert "".join(e.text for e in events) == handle.result().text


def test_seeded_sampling_does_not_depend_on_the_batch(model, engine):
    prompts = random_prompts(6, seed=1)[:5]
    options = [
        dict(temperature=0.9, top_k=40, top_p=0.95, seed=10 + i, max_tokens=20, ignore_eos=True) for i in range(5)
    ]
    options[2] |= dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3)
    expected = [alone(model, p, **o).token_ids for p, o in zip(prompts, options)]
    noise = [engine.submit(p, temperature=0, max_tokens=25, ignore_eos=True) for p in random_prompts(3, seed=9)[:2]]
    handles = [engine.submit(p, **o) for p, o in zip(prompts, options)]
    assert [h.result().token_ids for h in handles] == expected
    assert all(h.result().finish_reason == "length" for h in noise)


def test_vl_prompts_with_different_rope_deltas(make_vl, tmp_path):
    model = qwenvl.load(make_vl("qwen2_vl-d2", **VL_SHAPE))
    rng = np.random.default_rng(0)
    paths = []
    for index, (w, h) in enumerate([(100, 150), (200, 60), (64, 64)]):
        path = tmp_path / f"image{index}.png"
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3)).astype(np.uint8)).save(path)
        paths.append(str(path))
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": p}, {"type": "text", "text": f"Describe {i}."}]}]
        for i, p in enumerate(paths)
    ] + [
        [{"role": "user", "content": [{"type": "text", "text": "Two:"}, {"type": "image", "image": paths[0]},
                                      {"type": "image", "image": paths[1]}]}],
        [{"role": "user", "content": "No image here, just text."}],
    ]  # fmt: skip
    prompts = [model.prepare(c) for c in conversations]
    assert len({p.rope_delta for p in prompts}) >= 3
    expected = [alone(model, p, temperature=0, max_tokens=12 + i) for i, p in enumerate(prompts)]
    engine = BatchEngine(model, max_batch=8)
    try:
        handles = [engine.submit(p, temperature=0, max_tokens=12 + i) for i, p in enumerate(prompts)]
        for want, handle in zip(expected, handles):
            assert handle.result().token_ids == want.token_ids
            assert handle.result().text == want.text
    finally:
        engine.shutdown()


def test_cancel_mid_stream_frees_the_cache(model, engine):
    """A cancelled request's blocks go back to the pool (no block referenced once all have ended)."""
    prompts = random_prompts(4, seed=2)
    other = engine.submit(prompts[0], temperature=0, max_tokens=40, ignore_eos=True)
    handle = engine.submit(prompts[1], temperature=0, max_tokens=400, ignore_eos=True)
    events = handle.events(timeout=60)
    next(events), next(events)
    assert engine.stats()["kv_cache_bytes"] > 0
    handle.cancel()
    handle.cancel()  # idempotent
    rest = list(events)
    assert rest[-1].finish_reason == "cancelled" and rest[-1].token_ids == []
    assert handle.result().finish_reason == "cancelled" and len(handle.result().token_ids) < 400
    assert other.result().token_ids == alone(model, prompts[0], temperature=0, max_tokens=40, ignore_eos=True).token_ids
    stats = engine.stats()
    assert (stats["running"], stats["waiting"], stats["kv_cache_bytes"]) == (0, 0, 0)
    assert model.kv_pool.stats()["blocks_used"] == 0 and not any(model.kv_pool.refs)


def test_cancel_while_waiting(model):
    engine = BatchEngine(model, max_batch=1)
    try:
        prompt = random_prompts(2)[0]
        busy = engine.submit(prompt, temperature=0, max_tokens=300, ignore_eos=True)
        first_event(busy)
        queued = engine.submit(prompt, temperature=0, max_tokens=5)
        assert engine.stats()["waiting"] == 1
        queued.cancel()
        assert [e.finish_reason for e in queued.events(timeout=60)] == ["cancelled"]
        busy.cancel()
        assert busy.result().finish_reason == "cancelled"
    finally:
        engine.shutdown()


def test_a_failing_request_does_not_affect_the_others(model, engine, monkeypatch):
    prompts = random_prompts(5, seed=5)[:4]
    prompts = [p[:20] for p in prompts]
    expected = [alone(model, p, temperature=0, max_tokens=10, ignore_eos=True).token_ids for p in prompts]
    text_model = model.text_model
    poisoned_prefill, poisoned_start = 151640, 45  # a token id; a cache index only one request reaches
    embed, decode = text_model.embed, text_model.decode

    def failing_embed(ids):
        if (ids == poisoned_prefill).any():
            raise ValueError("poisoned prompt\nsecond line")
        return embed(ids)

    def failing_decode(embeds, positions, caches, starts, rope_alphas=None):
        if poisoned_start in starts:
            raise RuntimeError("poisoned step")
        return decode(embeds, positions, caches, starts, rope_alphas)

    def failing_sampler(self, logits, history, generated=None):
        if self.params.seed == 666:
            raise ZeroDivisionError("poisoned sampler")
        return original_sampler(self, logits, history, generated)

    original_sampler = Sampler.__call__
    monkeypatch.setattr(text_model, "embed", failing_embed)
    monkeypatch.setattr(text_model, "decode", failing_decode)
    monkeypatch.setattr(Sampler, "__call__", failing_sampler)
    good = [engine.submit(p, temperature=0, max_tokens=10, ignore_eos=True) for p in prompts[:2]]
    bad_prefill = engine.submit(prompts[2][:5] + [poisoned_prefill], temperature=0, max_tokens=10)
    bad_decode = engine.submit(list(range(1000, 1040)), temperature=0, max_tokens=30, ignore_eos=True)
    bad_sampler = engine.submit(prompts[3], temperature=0, max_tokens=10, seed=666)
    good += [engine.submit(p, temperature=0, max_tokens=10, ignore_eos=True) for p in prompts[2:]]
    for handle, message in [
        (bad_prefill, "ValueError: poisoned prompt"),
        (bad_decode, "RuntimeError: poisoned step"),
        (bad_sampler, "ZeroDivisionError: poisoned sampler"),
    ]:
        events = list(handle.events(timeout=60))
        assert events[-1].finish_reason == "error" and events[-1].error == message
        assert handle.result().finish_reason == "error" and handle.result().error == message
    assert len(bad_decode.result().token_ids) == 45 - 40 + 1  # streamed until the failing step
    assert [h.result().token_ids for h in good] == expected
    assert engine.stats()["kv_cache_bytes"] == 0


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ([1, 2, 3], dict(temperature=-1), "temperature"),
        ([1, 2, 3], dict(presence_penalty=2.5), "presence_penalty"),
        ([1, 2, 3], dict(tempreature=0.5), "unknown sampling option"),
        ([1, 2, 3], dict(max_tokens=0), "max_tokens"),
        ([1, 2, 3], dict(max_tokens=62), "exceeds the context of 64"),
        (list(range(100, 164)), dict(), "the context holds 64"),
        ([], dict(), "empty prompt"),
    ],
)
def test_invalid_requests_raise_at_submit(make_qwen2, prompt, sampling, message):
    model = qwenvl.load(make_qwen2("untied-gqa2", **TEXT_SHAPE), context=64)
    engine = BatchEngine(model)
    try:
        with pytest.raises(RequestError, match=message):
            engine.submit(prompt, **sampling)
        assert engine.stats()["waiting"] == 0
        assert engine.submit([1, 2, 3], max_tokens=61).result().completion_tokens <= 61  # within the context
    finally:
        engine.shutdown()


def test_full_queue_and_shutdown(model):
    engine = BatchEngine(model, max_batch=1, max_waiting=1)
    prompt = random_prompts(2)[0]
    busy = engine.submit(prompt, temperature=0, max_tokens=500, ignore_eos=True)
    first_event(busy)
    queued = engine.submit(prompt, temperature=0, max_tokens=5)
    assert queued.waiting and not busy.waiting
    with pytest.raises(BusyError, match="the queue is full"):
        engine.submit(prompt, temperature=0, max_tokens=5)
    engine.shutdown()
    assert not queued.waiting
    assert busy.result().finish_reason == "cancelled" and queued.result().finish_reason == "cancelled"
    assert engine.stats()["kv_cache_bytes"] == 0
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(prompt)


def test_decode_rows_equal_single_request_forward(model):
    """TextModel.decode over several requests gives each row what the single-request forward gives."""
    from qwenvl.engine.generate import decode_step, new_request, prefill
    from qwenvl.engine.prompt import Prompt
    from qwenvl.engine.sampler import sampling_params

    text_model = model.text_model
    params = sampling_params(model.generation_config, max_tokens=4)
    prompts = random_prompts(4, seed=7)[:3]
    with torch.inference_mode():
        pool = model.kv_pool
        requests = [new_request(text_model, model.tokenizer, Prompt.text_only(p), params, [0], 4096, pool=pool)
                    for p in prompts]  # fmt: skip
        singles = [new_request(text_model, model.tokenizer, Prompt.text_only(p), params, [0], 4096, pool=pool)
                   for p in prompts]  # fmt: skip
        for request in requests + singles:
            prefill(text_model, request)
            request.output_ids.append(7)
        want = torch.stack([decode_step(text_model, r, 7) for r in singles])
        embeds = text_model.embed(torch.full((3, 1), 7))
        positions = torch.tensor([r.next_position for r in requests]).view(1, -1, 1).expand(3, -1, -1)
        hidden = text_model.decode(embeds, positions, [r.cache for r in requests], [r.next_start for r in requests])
        assert torch.allclose(text_model.logits(hidden[:, -1]), want, atol=1e-2, rtol=0)
    for request in requests + singles:
        request.release_cache()
