"""--kernel q8 on the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (the demo extra's file): prompts
and decode steps multiplied with int8-quantized activations agree with the exact path, teacher-forced
over a long text (every position's next-token prediction; prompts as one forward, decoding one token
a step through the KV cache and the q8 GEMV): top-1 agreement ≥ 0.99 and logits cosine ≥ 0.999."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_quant_model import prompt_logits

import qwenvl
from qwenvl import defaults
from qwenvl.engine.kv_cache import KVPool
from qwenvl.quant.linear import BlockQuantLinear

TEXT = '''def quicksort(items):
    """Sort a list with quicksort and return a new list."""
    if len(items) <= 1:
        return list(items)
    pivot, *rest = items
    smaller = [x for x in rest if x < pivot]
    larger = [x for x in rest if x >= pivot]
    return quicksort(smaller) + [pivot] + quicksort(larger)


class Stack:
    """A last-in, first-out stack on top of a Python list."""

    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from an empty stack")
        return self._items.pop()

The capital of France is Paris. Water boils at 100 degrees Celsius at sea level, and the Earth goes
around the Sun once a year. 递归是一种函数调用自身来解决问题的方法。
'''


@pytest.fixture(scope="module")
def models():
    path = defaults.default_gguf_path()
    return qwenvl.load(path, dtype="float32"), qwenvl.load(path, dtype="float32", kernel="q8")


@pytest.mark.slow
def test_q8_prompts_agree_with_the_exact_path(models) -> None:
    exact, q8 = models
    assert any(isinstance(m, BlockQuantLinear) and m.q8 for m in q8.text_model.modules())
    assert not any(isinstance(m, BlockQuantLinear) and m.q8 for m in exact.text_model.modules())
    ids = exact.tokenizer.encode(TEXT)
    assert len(ids) > 200  # far more rows than the decode GEMV takes: the q8 GEMM runs
    want, got = prompt_logits(exact, ids), prompt_logits(q8, ids)
    agreement = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    cosines = F.cosine_similarity(want, got, dim=-1)
    assert agreement >= 0.99, agreement
    assert cosines.min().item() >= 0.999, cosines.min().item()
    assert not torch.equal(want, got)  # it is not the exact path


def decode_logits(model: qwenvl.api.Model, ids: list[int]) -> torch.Tensor:
    """Teacher-forced decoding: each token alone through the decode step (one row per linear layer),
    the logits [len(ids), vocab] of every position's next token."""
    text = model.text_model
    cache = KVPool(text.config, torch.float32, 64 << 20, block_size=16).sequence()
    rows = []
    with torch.inference_mode():
        for position, token in enumerate(ids):
            positions = torch.full((3, 1, 1), position)
            hidden = text.decode(text.embed(torch.tensor([[token]])), positions, [cache], [position])
            rows.append(text.logits(hidden)[0, -1].float())
    return torch.stack(rows)


@pytest.mark.slow
def test_q8_decoding_agrees_with_the_exact_path(models) -> None:
    exact, q8 = models
    ids = exact.tokenizer.encode(TEXT)
    want, got = decode_logits(exact, ids), decode_logits(q8, ids)
    agreement = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    cosines = F.cosine_similarity(want, got, dim=-1)
    assert agreement >= 0.99, agreement
    assert cosines.min().item() >= 0.999, cosines.min().item()
    assert not torch.equal(want, got)  # it is not the exact path
    # the decode steps ran the exact model's prompt logits too (the decode path itself is sound)
    assert F.cosine_similarity(want, prompt_logits(exact, ids), dim=-1).min().item() >= 0.9999


@pytest.mark.slow
def test_exact_prefill_turns_q8_off() -> None:
    model = qwenvl.load(defaults.default_gguf_path(), dtype="float32", kernel="q8", exact_prefill=True)
    assert not any(isinstance(m, BlockQuantLinear) and m.q8 for m in model.text_model.modules())
