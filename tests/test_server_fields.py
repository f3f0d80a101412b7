"""Nothing silently ignored: every refused field of the OpenAI / vLLM schemas is a 400 naming it (one
test per field), its harmless values pass, and the accepted no-effect fields change nothing."""

from __future__ import annotations

import pytest
import requests
from test_server_support import live_server

import qwenvl
from qwenvl.server.refusals import CHAT_FIELDS, COMPLETION_FIELDS, OPENAI_FIELDS, VLLM_FIELDS

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
# a value each refused field cannot have here, and (where one exists) a value it may have
REFUSED_VALUES = {
    "audio": ({"voice": "alloy", "format": "wav"}, None),
    "modalities": (["text", "audio"], ["text"]),
    "prediction": ({"type": "content", "content": "x"}, None),
    "functions": ([{"name": "f", "parameters": {}}], None),
    "function_call": ("auto", None),
    "store": (True, False),
    "service_tier": ("flex", "auto"),
    "reasoning_effort": ("low", None),
    "verbosity": ("low", None),
    "web_search_options": ({}, None),
    "prompt_cache_retention": ("24h", "in_memory"),
    "guided_json": ({"type": "object"}, None),
    "guided_regex": ("a+", None),
    "guided_choice": (["a"], None),
    "guided_grammar": ("start: 'a'", None),
    "guided_decoding_backend": ("xgrammar", None),
    "guided_whitespace_pattern": (" ", None),
    "min_tokens": (3, 0),
    "stop_token_ids": ([151645], []),
    "bad_words": (["x"], []),
    "allowed_token_ids": ([1, 2], None),
    "use_beam_search": (True, False),
    "length_penalty": (0.5, 1.0),
    "include_stop_str_in_output": (True, False),
    "skip_special_tokens": (False, True),
    "spaces_between_special_tokens": (False, True),
    "prompt_logprobs": (1, None),
    "truncate_prompt_tokens": (5, None),
    "logits_processors": (["x"], None),
    "priority": (1, 0),
    "echo": (True, False),
    "best_of": (2, 1),
    "chat_template": ("{{ messages }}", None),
    "chat_template_kwargs": ({"enable_thinking": False}, {}),
    "add_generation_prompt": (False, True),
    "continue_final_message": (True, False),
    "documents": ([{"text": "x"}], None),
    "suffix": ("tail", ""),
    "tools": ([{"type": "function", "function": {"name": "f"}}], None),
    "tool_choice": ("auto", None),
    "top_logprobs": (2, None),
}
CASES = [(CHAT, name) for name in {**CHAT_FIELDS, **OPENAI_FIELDS, **VLLM_FIELDS}] + [
    (TEXT, name) for name in {**COMPLETION_FIELDS, **OPENAI_FIELDS, **VLLM_FIELDS}
]


@pytest.fixture(scope="module")
def server(make_qwen2):
    with live_server(qwenvl.load(make_qwen2("default"), dtype="float32"), default_max_tokens=2) as running:
        yield running


def post(server, path: str, extra: dict) -> requests.Response:
    body = {"messages": [{"role": "user", "content": "Hi"}]} if path == CHAT else {"prompt": "Hi"}
    return requests.post(server.base_url + path, json={**body, "max_tokens": 2, **extra}, timeout=60)


def test_every_refused_field_has_values_here():
    assert {name for _, name in CASES} == set(REFUSED_VALUES)


@pytest.mark.parametrize("path,name", CASES, ids=[f"{'chat' if p == CHAT else 'text'}-{n}" for p, n in CASES])
def test_refused_field(server, path, name):
    refused, harmless = REFUSED_VALUES[name]
    response = post(server, path, {name: refused})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == name and name in error["message"] and "not supported" in error["message"]
    if harmless is not None or name in ("audio", "prediction"):
        assert post(server, path, {name: harmless}).status_code == 200


def test_top_logprobs_needs_logprobs(server):
    response = post(server, CHAT, {"top_logprobs": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"
    assert post(server, CHAT, {"logprobs": True, "top_logprobs": 21}).status_code == 400
    assert post(server, TEXT, {"logprobs": True}).status_code == 400  # an integer on completions


def test_no_effect_fields_and_unknown_vendor_fields_change_nothing(server):
    plain = post(server, CHAT, {"temperature": 0}).json()
    extra = {
        "user": "u-1", "safety_identifier": "s-1", "prompt_cache_key": "k", "metadata": {"a": "b"}, "store": False,
        "service_tier": "default", "stream_options": None, "some_vendor_field": {"x": 1}, "parallel_tool_calls": True,
    }  # fmt: skip
    answer = post(server, CHAT, {"temperature": 0, **extra}).json()
    assert answer["choices"][0]["message"] == plain["choices"][0]["message"]
    assert answer["usage"] == plain["usage"]
