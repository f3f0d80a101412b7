"""The real Qwen2.5-Coder-0.5B-Instruct (the registry GGUF that the demo extra ships)."""

from __future__ import annotations

import json

import pytest
import torch

import qwenvl
from qwenvl import defaults
from qwenvl.cli import main as cli_main

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France? Answer in one word.",
    "用一句话解释什么是递归。",
    "Explain the difference between a list and a tuple in Python.",
]


def test_default_model_answers_coherently(monkeypatch, capsys):
    """The main job: no model argument → the embedded GGUF, a real answer."""
    code = cli_main(["run", "-p", PROMPTS[1], "--temperature", "0", "--max-tokens", "8", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"].endswith(".gguf")
    assert "Paris" in result["text"]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_real_model_as_hf_checkpoint_matches_transformers(capsys, prompt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = defaults.default_hf_export_path()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.inference_mode():
        expected = reference.generate(ids, do_sample=False, max_new_tokens=32)[0, ids.shape[1] :].tolist()
    code = cli_main(
        [
            "run",
            str(directory),
            "-p",
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            "32",
            "--json",
            "--dtype",
            "float32",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] == ids.shape[1]
    assert result["tokens"] == expected


@pytest.mark.slow
def test_gguf_and_its_export_answer_alike():
    """Running the GGUF directly (dequantized at load) equals running its float32 HF export."""
    gguf_model = qwenvl.load(defaults.default_gguf_path(), dtype="float32")
    hf_model = qwenvl.load(defaults.default_hf_export_path(), dtype="float32")
    messages = [{"role": "user", "content": PROMPTS[0]}]
    assert gguf_model.prepare(messages).input_ids == hf_model.prepare(messages).input_ids
    a = gguf_model.chat(messages, temperature=0, max_tokens=24)
    b = hf_model.chat(messages, temperature=0, max_tokens=24)
    assert a.token_ids == b.token_ids


@pytest.mark.slow
def test_second_turn_from_the_prefix_cache_equals_cold():
    """The real GGUF: a second chat turn served from the first turn's cached KV gives the greedy
    tokens of the same turn with the prefix cache off (benchmarks/prefix_cache.py times it)."""
    warm, cold = qwenvl.load(), qwenvl.load(prefix_cache=False)
    first = [
        {"role": "system", "content": "You are a careful reviewer. " * 20},
        {"role": "user", "content": PROMPTS[0]},
    ]
    answer = warm.chat(first, temperature=0, max_tokens=24)
    second = first + [{"role": "assistant", "content": answer.text}, {"role": "user", "content": PROMPTS[3]}]
    got, want = warm.chat(second, temperature=0, max_tokens=24), cold.chat(second, temperature=0, max_tokens=24)
    assert got.cached_tokens >= answer.prompt_tokens - 16 and want.cached_tokens == 0
    assert got.token_ids == want.token_ids


SMALL_EDIT = """Add type hints to this function and return the whole code:

```python
def scale(values, factor, offset=0.0):
    result = []
    for value in values:
        result.append(value * factor + offset)
    return result
```"""


def test_speculative_greedy_equals_plain_on_the_real_model():
    """Prompt lookup on the embedded GGUF: the same tokens as plain decoding (the answer starts by
    copying the function, so drafts are kept)."""
    model = qwenvl.load(defaults.default_gguf_path())
    messages = [{"role": "user", "content": SMALL_EDIT}]
    plain = model.chat(messages, temperature=0, max_tokens=40)
    spec = model.chat(messages, temperature=0, max_tokens=40, speculative="ngram", spec_tokens=5)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert spec.accepted_tokens > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["code_edit", "no_copy"])
def test_speculative_greedy_equals_plain_on_the_benchmark_prompts(name):
    """benchmarks/prompts/: the 60-line code edit and the prompt with nothing to copy, 200 tokens."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "benchmarks" / "prompts" / f"{name}.txt").read_text()
    model = qwenvl.load(defaults.default_gguf_path())
    messages = [{"role": "user", "content": text}]
    plain = model.chat(messages, temperature=0, max_tokens=200)
    for k in (3, 8):
        spec = model.chat(messages, temperature=0, max_tokens=200, speculative="ngram", spec_tokens=k)
        assert spec.token_ids == plain.token_ids
