"""Logprobs equal transformers' log_softmax of the same model's logits (tiny fp32 checkpoint, 1e-4):
chat (streamed and not, with top_logprobs), completions (logprobs and echo with the prompt's), and
the Python API."""

from __future__ import annotations

import openai
import pytest
import torch
from test_server_support import live_server

import qwenvl

TOLERANCE = 1e-4
TOP = 5
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(make_qwen2):
    return make_qwen2("default")


@pytest.fixture(scope="module")
def model(checkpoint):
    return qwenvl.load(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """log_softmax of transformers' logits at every position of a token sequence, [L, vocab]."""
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


@pytest.fixture(scope="module")
def client(model):
    with live_server(model, max_batch=4) as running:
        yield openai.OpenAI(base_url=running.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_reference(reference, prompt_ids: list[int], count: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation and the log-probabilities before each generated token."""
    ids = list(prompt_ids)
    for _ in range(count):
        ids.append(int(reference(ids)[-1].argmax()))
    full = reference(ids)
    return ids[len(prompt_ids) :], full[len(prompt_ids) - 1 : len(ids) - 1]


def check_entry(entry: dict, token_id: int, row: torch.Tensor, tokenizer) -> None:
    assert entry["bytes"] == list(tokenizer.token_bytes(token_id))
    assert abs(entry["logprob"] - float(row[token_id])) < TOLERANCE
    values, ids = row.topk(len(entry["top_logprobs"]))
    for alternative, value, token in zip(entry["top_logprobs"], values.tolist(), ids.tolist()):
        assert abs(alternative["logprob"] - value) < TOLERANCE
        assert alternative["bytes"] == list(tokenizer.token_bytes(token))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_transformers(client, model, reference, stream):
    messages = [{"role": "user", "content": "Tell me something."}]
    prompt_ids = model.prepare(messages).input_ids
    generated, rows = greedy_reference(reference, prompt_ids, MAX_TOKENS)
    options = dict(
        model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=TOP
    )
    if stream:
        chunks = list(client.chat.completions.create(**options, stream=True))
        entries = [
            e.model_dump() for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
        ]
    else:
        choice = client.chat.completions.create(**options).choices[0]
        entries = [entry.model_dump() for entry in choice.logprobs.content]
    assert len(entries) == MAX_TOKENS
    for entry, token_id, row in zip(entries, generated, rows):
        assert len(entry["top_logprobs"]) == TOP
        check_entry(entry, token_id, row, model.tokenizer)


def test_logprobs_are_of_the_raw_logits(model, reference):
    """Sampling adjustments (temperature, top_k, penalties, logit_bias) change the choice, not the values."""
    messages = [{"role": "user", "content": "Another one."}]
    prompt_ids = model.prepare(messages).input_ids
    biased = model.tokenizer.encode(" banana")[0]
    result = model.chat(
        messages, max_tokens=6, temperature=1.7, top_k=3, presence_penalty=1.5, seed=11, logprobs=0,
        logit_bias={biased: 5.0}, ignore_eos=True,
    )  # fmt: skip
    rows = reference(prompt_ids + result.token_ids)[len(prompt_ids) - 1 : -1]
    assert [entry.token_id for entry in result.logprobs] == result.token_ids
    for entry, row in zip(result.logprobs, rows):
        assert entry.top == [] and abs(entry.logprob - float(row[entry.token_id])) < TOLERANCE


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_and_echo_equal_transformers(client, model, reference, stream):
    prompt = "The quick brown fox"
    prompt_ids = model.tokenizer.encode(prompt)
    generated, rows = greedy_reference(reference, prompt_ids, MAX_TOKENS)
    prompt_rows = reference(prompt_ids)
    options = dict(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=3, echo=True)
    if stream:
        chunks = list(client.completions.create(**options, stream=True))
        text = "".join(chunk.choices[0].text for chunk in chunks)
        parts = [chunk.choices[0].logprobs for chunk in chunks if chunk.choices[0].logprobs]
        logprobs = {key: [item for part in parts for item in getattr(part, key)] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}  # fmt: skip
    else:
        choice = client.completions.create(**options).choices[0]
        text, logprobs = choice.text, choice.logprobs.model_dump()
    assert text.startswith(prompt)
    count = len(prompt_ids)
    assert len(logprobs["tokens"]) == count + MAX_TOKENS
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for position in range(1, count):
        expected = float(prompt_rows[position - 1][prompt_ids[position]])
        assert abs(logprobs["token_logprobs"][position] - expected) < TOLERANCE
    for index, (token_id, row) in enumerate(zip(generated, rows)):
        assert abs(logprobs["token_logprobs"][count + index] - float(row[token_id])) < TOLERANCE
        assert len(logprobs["top_logprobs"][count + index]) <= 3
        best = max(logprobs["top_logprobs"][count + index].values())
        assert abs(best - float(row.max())) < TOLERANCE
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and "".join(logprobs["tokens"]) == text


def test_completion_logprobs_without_echo(client, model, reference):
    prompt_ids = model.tokenizer.encode("def add(a, b):")
    generated, rows = greedy_reference(reference, prompt_ids, 4)
    choice = client.completions.create(
        model="tiny", prompt=prompt_ids, max_tokens=4, temperature=0, logprobs=0
    ).choices[0]
    assert choice.logprobs.top_logprobs == [{}] * 4 and choice.logprobs.text_offset[0] == 0
    for value, token_id, row in zip(choice.logprobs.token_logprobs, generated, rows):
        assert abs(value - float(row[token_id])) < TOLERANCE


def test_api_logprobs(model, reference):
    messages = [{"role": "user", "content": "Hi"}]
    prompt = model.prepare(messages)
    result = model.chat(messages, max_tokens=5, temperature=0, logprobs=2)
    generated, rows = greedy_reference(reference, prompt.input_ids, 5)
    ends_on_eos = result.finish_reason == "stop"
    assert [entry.token_id for entry in result.logprobs] == generated[: len(result.logprobs)]
    assert len(result.logprobs) == len(result.token_ids) - ends_on_eos
    for entry, row in zip(result.logprobs, rows):
        assert abs(entry.logprob - float(row[entry.token_id])) < TOLERANCE and len(entry.top) == 2
    generation = model.generate(prompt, max_tokens=1, temperature=0, prompt_logprobs=1)
    list(generation)
    assert generation.result.prompt_logprobs[0] is None
    full = reference(prompt.input_ids)
    for position, entry in enumerate(generation.result.prompt_logprobs[1:], start=1):
        assert abs(entry.logprob - float(full[position - 1][prompt.input_ids[position]])) < TOLERANCE
