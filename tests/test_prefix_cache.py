"""The block KV cache and prefix caching (engine/kv_cache.py): a request served from a cached prefix
gives what the same request gives with the cache off, on text, images, video and Qwen2.5-VL time ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import qwenvl
from qwenvl.engine.generate import new_request, prefill
from qwenvl.engine.kv_cache import KVCacheFull, KVPool, block_hashes
from qwenvl.engine.sampler import sampling_params
from qwenvl.engine.scheduler import BatchEngine
from qwenvl.errors import RequestError

TEXT_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, tie=False)
VL_SHAPES = {
    "qwen2_vl": dict(arch="qwen2_vl", hidden=64, heads=4, kv_heads=2, ffn=128, mrope_section=[2, 3, 3]),
    "qwen2_5_vl": dict(arch="qwen2_5_vl", hidden=64, heads=4, kv_heads=2, ffn=128, mrope_section=[2, 3, 3]),
}
GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def text_models(make_qwen2):
    directory = make_qwen2("untied-gqa2", **TEXT_SHAPE)
    return qwenvl.load(directory), qwenvl.load(directory, prefix_cache=False)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefix-pictures")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(3):
        pixels = rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)  # same size: the same grid
        paths.append(str(folder / f"p{index}.png"))
        Image.fromarray(pixels).save(paths[-1])
    frames = []
    for index in range(4):
        frames.append(str(folder / f"f{index}.png"))
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(frames[-1])
    return paths, frames


def text_chat(turns: int) -> list[list[dict]]:
    """The message lists of a growing conversation, one per turn."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    messages = [{"role": "system", "content": "You are terse. " * 5}]
    out = []
    for turn in range(turns):
        messages = messages + [{"role": "user", "content": " ".join(words[turn:] * 4)}]
        out.append(messages)
        messages = messages + [{"role": "assistant", "content": f"answer number {turn} " * 3}]
    return out


def assert_same_answers(cached: qwenvl.Model, plain: qwenvl.Model, conversations, **options):
    """Each conversation answered by both models: the same tokens; returns the cached side's results."""
    results = []
    for messages in conversations:
        got = cached.chat(messages, **GREEDY, **options)
        want = plain.chat(messages, **GREEDY, **options)
        assert got.token_ids == want.token_ids and got.text == want.text
        assert want.cached_tokens == 0
        results.append(got)
    assert not any(cached.kv_pool.refs) and not any(plain.kv_pool.refs)  # every block released
    return results


def test_multi_turn_text_chat_reuses_the_history(text_models):
    cached, plain = text_models
    results = assert_same_answers(cached, plain, text_chat(3))
    for earlier, later in zip(results, results[1:]):
        assert later.cached_tokens >= earlier.prompt_tokens - cached.kv_pool.block_size
        assert later.cached_tokens % cached.kv_pool.block_size == 0


def test_first_token_logits_match_the_uncached_prefill(text_models):
    cached, plain = text_models
    ids = cached.prepare(text_chat(2)[1]).input_ids
    cached.chat(text_chat(2)[0], max_tokens=1)  # fills the cache with the first turn's prompt

    def logits(model):
        params = sampling_params(model.generation_config, temperature=0)
        request = new_request(model.text_model, model.tokenizer, qwenvl.engine.prompt.Prompt.text_only(ids), params,
                              [0], model.context, pool=model.kv_pool)  # fmt: skip
        try:
            with torch.inference_mode():
                return prefill(model.text_model, request), request.cache.cached_tokens
        finally:
            request.release_cache()

    (warm, hit), (cold, miss) = logits(cached), logits(plain)
    assert hit > 0 and miss == 0
    assert (warm - cold).abs().max().item() < 1e-4


def test_prompts_sharing_a_prefix_to_the_middle_of_a_block(text_models):
    cached, plain = text_models
    base = list(range(1000, 1000 + 40))  # 2.5 blocks
    prompts = [base, base[:24] + [7, 8, 9] + base[24:], base[:33] + [5] * 20, base[:16], base + [3]]
    for prompt in prompts:
        got, want = cached.generate(prompt, **GREEDY), plain.generate(prompt, **GREEDY)
        assert list(got) == list(want) and got.result.token_ids == want.result.token_ids
    assert got.result.cached_tokens == 32  # the last prompt: two full blocks of the first


def test_images_each_keyed_on_their_own(make_vl, pictures):
    directory = make_vl("prefix-vl", **VL_SHAPES["qwen2_vl"])
    cached, plain = qwenvl.load(directory), qwenvl.load(directory, prefix_cache=False)
    (a, b, _), _ = pictures
    image = lambda path: {"type": "image", "image": path}  # noqa: E731
    turn1 = [{"role": "user", "content": [image(a), {"type": "text", "text": "What is this?"}]}]
    turn2 = turn1 + [
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [image(b), {"type": "text", "text": "And this one?"}]},
    ]
    turn3 = turn2 + [
        {"role": "assistant", "content": "Another."},
        {"role": "user", "content": [image(a), {"type": "text", "text": "The first again?"}]},
    ]
    other = [{"role": "user", "content": [image(b), {"type": "text", "text": "What is this?"}]}]  # turn1 but b
    results = assert_same_answers(cached, plain, [turn1, turn2, turn3, other])
    assert results[1].cached_tokens >= results[0].prompt_tokens - 16
    assert results[2].cached_tokens >= results[1].prompt_tokens - 16
    first_pad = cached.prepare(other).input_ids.index(cached.config.image_token_id)
    assert results[3].cached_tokens == first_pad // 16 * 16  # shared up to the block where b's pads start


def test_clear_caches_makes_the_next_request_cold(make_vl, pictures):
    """``Model.clear_caches``: the prompt's blocks and the image's encoding are forgotten (the same
    request then reuses nothing and encodes the image again) and the answer is unchanged."""
    cached = qwenvl.load(make_vl("prefix-vl", **VL_SHAPES["qwen2_vl"]))
    (a, _, _), _ = pictures
    messages = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "What?"}]}]
    first = cached.chat(messages, **GREEDY)
    warm = cached.chat(messages, **GREEDY)
    assert warm.cached_tokens > 0 and cached.vision_cache.hits == 1
    misses = cached.vision_cache.misses
    cached.clear_caches()
    assert cached.kv_pool.stats()["blocks_cached"] == 0
    cold = cached.chat(messages, **GREEDY)
    assert cold.cached_tokens == 0 and cached.vision_cache.misses == misses + 1
    assert first.token_ids == warm.token_ids == cold.token_ids
    assert cached.chat(messages, **GREEDY).cached_tokens == warm.cached_tokens  # cached again
    assert not any(cached.kv_pool.refs)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_video_and_time_ids(make_vl, pictures, arch):
    directory = make_vl(f"prefix-video-{arch}", **VL_SHAPES[arch])
    cached, plain = qwenvl.load(directory), qwenvl.load(directory, prefix_cache=False)
    (a, _, _), frames = pictures
    video = {"type": "video", "video": frames, "fps": 2.0, "min_pixels": 56 * 56}
    turn1 = [{"role": "user", "content": [video, {"type": "text", "text": "Describe."}]}]
    turn2 = turn1 + [
        {"role": "assistant", "content": "Frames."},
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "And?"}]},
    ]
    results = assert_same_answers(cached, plain, [turn1, turn2])
    assert results[1].cached_tokens > 0


def test_block_hashes_name_the_image_content_and_size(make_vl, pictures):
    model = qwenvl.load(make_vl("prefix-vl", **VL_SHAPES["qwen2_vl"]))
    (a, b, _), _ = pictures

    def hashes(path, **media):
        prompt = model.prepare([{"role": "user", "content": [{"type": "image", "image": path}]}], **media)
        return prompt, block_hashes(prompt.input_ids, prompt.position_ids, prompt.visual_items, prompt.visual_token_ids)

    (pa, ha), (pb, hb) = hashes(a), hashes(b)
    assert pa.input_ids == pb.input_ids and torch.equal(pa.position_ids, pb.position_ids)  # same grid
    first_pad = pa.input_ids.index(model.config.image_token_id)
    shared = first_pad // 16
    assert ha[:shared] == hb[:shared] and not set(ha[shared:]) & set(hb[shared:])
    pc, hc = hashes(a, max_pixels=56 * 56)
    assert len(pc.input_ids) < len(pa.input_ids) and not set(ha[shared:]) & set(hc[shared:])


def test_eviction_under_a_tiny_budget(make_qwen2, text_models):
    _, plain = text_models
    tiny = qwenvl.load(make_qwen2("untied-gqa2", **TEXT_SHAPE), kv_cache_mb=1)  # 128 blocks: 2,048 tokens
    assert tiny.kv_pool.num_blocks == 128
    prompts = [[2000 + 17 * i + j for j in range(700)] for i in range(4)]
    for prompt in prompts + prompts[::-1]:  # the second pass finds some evicted, some cached
        got, want = tiny.generate(prompt, **GREEDY), plain.generate(prompt, **GREEDY)
        assert list(got) == list(want)
    assert tiny.kv_pool.stats()["blocks_cached"] <= 128 and not any(tiny.kv_pool.refs)
    with pytest.raises(KVCacheFull, match="kv-cache-mb"):
        list(tiny.generate([5] * 2100, max_tokens=2))
    assert not any(tiny.kv_pool.refs)
    engine = BatchEngine(tiny, max_batch=2)
    try:
        with pytest.raises(RequestError, match="does not fit the KV cache"):
            engine.submit([5] * 2100, max_tokens=2)
        # two prompts of 63 blocks each fit; their answers need 69 each: one runs out mid-decode, and
        # says it is the cache's budget (the server's 503 to retry), not a fault
        handles = [engine.submit([7 + i] * 1000, max_tokens=100, temperature=0, ignore_eos=True) for i in range(2)]
        finals = [[event for event in handle.events()][-1] for handle in handles]
    finally:
        engine.shutdown()
    assert sorted(event.finish_reason for event in finals) == ["error", "length"]
    assert [event.busy for event in finals if event.finish_reason == "error"] == [True]
    assert not any(tiny.kv_pool.refs)


def plain_greedy_ids(plain: qwenvl.Model, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's greedy token ids from the model without a prefix cache, one request at a time."""
    ids = []
    for prompt in prompts:
        generation = plain.generate(prompt, **GREEDY)
        list(generation)
        ids.append(generation.result.token_ids)
    return ids


def test_concurrent_requests_sharing_a_prefix(text_models):
    cached, plain = text_models
    system = list(range(3000, 3000 + 100))
    prompts = [system + [500 + i] * (i + 1) for i in range(6)]
    want = plain_greedy_ids(plain, prompts)
    engine = BatchEngine(cached, max_batch=4)
    try:
        first = engine.submit(prompts[0], **GREEDY).result()
        handles = [engine.submit(p, **GREEDY) for p in prompts[1:]]
        results = [first] + [h.result() for h in handles]
    finally:
        engine.shutdown()
    assert [r.token_ids for r in results] == want
    assert all(r.cached_tokens == 96 for r in results[1:])
    assert not any(cached.kv_pool.refs)


def test_requests_arriving_together_prefill_a_shared_prefix_once(text_models, monkeypatch):
    """All queued before the engine admits any: the first prefills the shared 96 tokens, the others
    wait for its blocks instead of computing them again (the server's clients sharing a system prompt)."""
    cached, plain = text_models
    system = list(range(3200, 3200 + 100))
    prompts = [system + [600 + i] * (i + 2) for i in range(4)]
    want = plain_greedy_ids(plain, prompts)
    engine = BatchEngine(cached, max_batch=4)
    monkeypatch.setattr(engine, "start", lambda: None)  # queue every request before the loop runs
    handles = [engine.submit(p, **GREEDY) for p in prompts]
    monkeypatch.undo()
    try:
        engine.start()
        results = [h.result() for h in handles]
    finally:
        engine.shutdown()
    assert [r.token_ids for r in results] == want
    assert [r.cached_tokens for r in results] == [0, 96, 96, 96]
    assert not any(cached.kv_pool.refs)


def test_prompt_logprobs_compute_the_whole_prompt(text_models):
    cached, plain = text_models
    prompt = list(range(4000, 4050))
    list(cached.generate(prompt, max_tokens=1))
    got = cached.generate(prompt, max_tokens=1, prompt_logprobs=1)
    list(got)
    want = plain.generate(prompt, max_tokens=1, prompt_logprobs=1)
    list(want)
    assert got.result.cached_tokens == 0
    assert [e and e.token_id for e in got.result.prompt_logprobs] == [
        e and e.token_id for e in want.result.prompt_logprobs
    ]


def test_truncate_and_fork_never_modify_a_shared_block():
    from qwenvl.config import TextConfig

    config = TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, vocab_size=100)  # fmt: skip
    pool = KVPool(config, torch.float32, 8 * 2 * 16 * 16 * 4, block_size=16)  # 8 blocks
    seq = pool.sequence()
    seq.prepare_write(0, 40)
    seq.write(0, 0, torch.ones(1, 40, 16), torch.ones(1, 40, 16))
    twin = seq.fork()
    assert pool.refs[seq.blocks[0]] == 2 and twin.blocks == seq.blocks
    twin.truncate(20)
    assert twin.blocks == seq.blocks[:2] and pool.refs[seq.blocks[2]] == 1
    twin.prepare_write(20, 1)  # writes into block 1, shared: copied first
    assert twin.blocks[1] != seq.blocks[1] and twin.blocks[0] == seq.blocks[0]
    twin.write(0, 20, torch.zeros(1, 1, 16), torch.zeros(1, 1, 16))
    keys, _ = seq.gather(0, 40)
    assert torch.equal(keys, torch.ones(1, 40, 16))
    keys, _ = twin.gather(0, 21)
    assert torch.equal(keys[0, :20], torch.ones(20, 16)) and torch.equal(keys[0, 20], torch.zeros(16))
    with pytest.raises(ValueError, match="truncate"):
        twin.truncate(30)
    seq.release(), twin.release(), twin.release()
    assert not any(pool.refs) and len(pool.free) == 8


def test_chat_choices_fork_the_prompt(text_models):
    cached, plain = text_models
    messages = text_chat(1)[0]
    greedy = plain.chat(messages, **GREEDY)
    choices = cached.chat_choices(messages, 3, **GREEDY)
    assert [c.token_ids for c in choices] == [greedy.token_ids] * 3
    sampled = dict(temperature=1.0, top_p=1.0, seed=5, max_tokens=12)
    want = [plain.chat(messages, **{**sampled, "seed": 5 + i}).token_ids for i in range(3)]
    assert [c.token_ids for c in cached.chat_choices(messages, 3, **sampled)] == want
    assert len({tuple(ids) for ids in want}) > 1
    spec = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for choice in cached.chat_choices(messages, 2, json_schema=spec, max_tokens=40, temperature=1.0, seed=1):
        assert choice.text.startswith("{")
    assert not any(cached.kv_pool.refs)


def test_qwen_v1_dynamic_ntk_prompts_of_another_rope_factor_share_nothing(make_qwen_v1):
    """Qwen (v1) rescales rope by prompt length past seq_length: a longer prompt has other keys for
    the same prefix, so it must not take the shorter prompt's blocks; same-length ones may."""
    directory = make_qwen_v1("seq64", seq_length=64)
    cached, plain = qwenvl.load(directory, dtype="float32"), qwenvl.load(directory, dtype="float32", prefix_cache=False)
    short = list(range(500, 560))  # under seq_length: rope factor 1
    long = short + list(range(700, 760))  # past it: another factor
    for prompt in (short, long, long[:-1] + [9], short[:-1] + [9]):
        got, want = cached.generate(prompt, **GREEDY), plain.generate(prompt, **GREEDY)
        assert list(got) == list(want) and got.result.token_ids == want.result.token_ids
        hits = got.result.cached_tokens
    assert cached.text_model.rope_alpha(len(long)) != 1.0
    assert hits == 48  # the last short prompt: three blocks of the first (the long ones shared none of it)


def test_the_server_answers_a_full_cache_with_a_503_to_retry():
    from qwenvl.server.streaming import Answer, _failure

    busy = _failure(Answer(finish_reason="error", error="no free KV block", busy=True))
    fault = _failure(Answer(finish_reason="error", error="boom"))
    assert (busy.status, busy.code, busy.headers["Retry-After"]) == (503, "kv_cache_full", "5")
    assert (fault.status, fault.code) == (500, None)
