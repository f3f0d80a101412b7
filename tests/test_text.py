"""Parity of the Qwen2 decoder and greedy generation with transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

import qwenvl
from qwenvl.engine.prompt import Prompt
from qwenvl.models.rope import text_position_ids

SHAPES = {
    "untied-gqa2": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, tie=False),
    "tied-mha-hd12": dict(hidden=48, layers=3, heads=4, kv_heads=4, ffn=96, tie=True),
    "gqa7-hd20": dict(hidden=140, layers=2, heads=7, kv_heads=1, ffn=200, tie=False),
    "tied-gqa2-hd40": dict(hidden=160, layers=2, heads=4, kv_heads=2, ffn=96, tie=True),
}
PROMPTS = [
    "def fibonacci(n):",
    "你好，世界！今天天气怎么样？",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


def hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def full_logits(model: qwenvl.Model, ids: list[int]) -> torch.Tensor:
    text = model.text_model
    with torch.inference_mode():
        embeds = text.embed(torch.tensor([ids]))
        return text.logits(text(embeds, text_position_ids(0, len(ids))[:, None, :]))[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_prompt_logits_match_transformers(make_qwen2, shape):
    directory = make_qwen2(shape, **SHAPES[shape])
    ours = qwenvl.load(directory, dtype="float32")
    reference = hf_model(directory)
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        with torch.inference_mode():
            expected = reference(torch.tensor([ids])).logits[0]
        assert (full_logits(ours, ids) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_generation_matches_transformers(make_qwen2, shape):
    directory = make_qwen2(shape, **SHAPES[shape])
    ours = qwenvl.load(directory, dtype="float32")
    reference = hf_model(directory)
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        with torch.inference_mode():
            out = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32)
        expected = out[0, len(ids) :].tolist()
        generation = ours.generate(ids, temperature=0, max_tokens=32)
        list(generation)
        assert generation.result.token_ids == expected


def test_decode_steps_equal_full_forward(make_qwen2):
    """Logits from the KV-cached decode path equal a fresh full forward over the same ids."""
    ours = qwenvl.load(make_qwen2("untied-gqa2", **SHAPES["untied-gqa2"]), dtype="float32")
    ids = ours.tokenizer.encode(PROMPTS[0])
    generation = ours.generate(ids, temperature=0, max_tokens=8)
    list(generation)
    sequence = ids + generation.result.token_ids
    logits = full_logits(ours, sequence)
    greedy = logits[len(ids) - 1 : -1].argmax(-1).tolist()
    assert greedy == generation.result.token_ids


def test_text_half_of_qwen2_vl_matches_transformers(make_vl):
    from transformers import Qwen2VLForConditionalGeneration

    directory = make_vl("text-only", arch="qwen2_vl", hidden=64, heads=4, kv_heads=2, ffn=128)
    ours = qwenvl.load(directory, dtype="float32")
    reference = Qwen2VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "Describe a sunset in one sentence."}]
    prompt = ours.prepare(messages)
    ids = torch.tensor([prompt.input_ids])
    with torch.inference_mode():
        expected_logits = reference(input_ids=ids).logits[0]
        out = reference.generate(ids, do_sample=False, max_new_tokens=24)
    assert (full_logits(ours, prompt.input_ids) - expected_logits).abs().max().item() <= 1e-4
    result = ours.chat(messages, temperature=0, max_tokens=24)
    assert result.token_ids == out[0, ids.shape[1] :].tolist()


def test_mrope_equals_rope_for_text():
    from qwenvl.models.rope import rope_cos_sin, rope_inv_freq

    positions = text_position_ids(5, 7)[:, None, :]
    inv_freq = rope_inv_freq(64, 1e6)
    plain = rope_cos_sin(positions, inv_freq, None)
    sectioned = rope_cos_sin(positions, inv_freq, (4, 14, 14))
    assert torch.equal(plain[0], sectioned[0]) and torch.equal(plain[1], sectioned[1])


def test_prompt_object_positions():
    prompt = Prompt.text_only([1, 2, 3])
    assert prompt.position_ids.tolist() == [[0, 1, 2]] * 3 and prompt.rope_delta == 0


def test_bfloat16_path_agrees_with_float32(make_qwen2):
    directory = make_qwen2("untied-gqa2", **SHAPES["untied-gqa2"])
    fp32 = qwenvl.load(directory, dtype="float32")
    bf16 = qwenvl.load(directory, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    ids = fp32.tokenizer.encode(PROMPTS[2])
    a, b = full_logits(fp32, ids), full_logits(bf16, ids)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cosine.min().item() >= 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


def test_ignore_eos_generates_exactly_max_tokens(make_qwen2):
    model = qwenvl.load(make_qwen2("untied-gqa2", **SHAPES["untied-gqa2"]), dtype="float32")
    eos = model.generation_config.eos_token_ids[0]
    ids = model.tokenizer.encode(PROMPTS[0])
    real_logits = model.text_model.logits

    def eos_favoured(hidden):  # EOS becomes the greedy choice at every step
        logits = real_logits(hidden)
        logits[..., eos] = logits.max() + 1
        return logits

    model.text_model.logits = eos_favoured
    stopped = model.generate(ids, temperature=0, max_tokens=6)
    list(stopped)
    assert stopped.result.token_ids == [eos] and stopped.result.finish_reason == "stop"
    forced = model.generate(ids, temperature=0, max_tokens=6, ignore_eos=True)
    list(forced)
    assert len(forced.result.token_ids) == 6 and forced.result.finish_reason == "length"
