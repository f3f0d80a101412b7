"""Structured outputs and tool calls under llguidance's constraint, on a tiny random Qwen2 checkpoint:
whatever random weights want, the answer follows the schema; the masks, the vocabulary and EOS; a
constrained row does not change the other rows of a batch; the openai client against a live server."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
import requests
from pydantic import BaseModel, Field
from test_server_support import live_server

import qwenvl
from qwenvl.engine.grammar import GrammarError, GrammarSpec, ToolCallGrammar
from qwenvl.engine.scheduler import BatchEngine
from qwenvl.errors import RequestError

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": -3, "maximum": 12},
        "rows": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"level": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
                "required": ["level", "ok"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["colour", "count", "rows"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Zürich", "東京"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}  # fmt: skip
MESSAGES = [{"role": "user", "content": "Fill in the form."}]


def assert_valid(answer: dict) -> None:
    """SCHEMA, checked by hand."""
    assert set(answer) == {"colour", "count", "rows"}
    assert answer["colour"] in ("red", "green", "blue")
    assert type(answer["count"]) is int and -3 <= answer["count"] <= 12
    assert isinstance(answer["rows"], list) and len(answer["rows"]) <= 3
    for row in answer["rows"]:
        assert set(row) == {"level", "ok"} and type(row["level"]) is int and 0 <= row["level"] <= 99
        assert type(row["ok"]) is bool


@pytest.fixture(scope="module")
def model(make_qwen2):
    return qwenvl.load(make_qwen2("default"), dtype="float32")


@pytest.fixture(scope="module")
def server(model):
    with live_server(model, max_batch=4) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def schema_format(schema: dict = SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "form", "schema": schema, "strict": True}}


# -- the engine ---------------------------------------------------------------------------------------


def test_ids_without_a_token_are_never_allowed_and_eos_only_where_the_grammar_accepts(model):
    compiler = model.grammar_compiler
    assert model.tokenizer.vocab_size < model.config.text.vocab_size == 151936
    constraint = compiler.constraint(GrammarSpec("regex", "[a-z]{1,4}"))
    eos = list(compiler.eos_token_ids)
    allowed = constraint.allowed()
    assert allowed.shape == (151936,) and allowed[: model.tokenizer.vocab_size].any()
    assert not allowed[model.tokenizer.vocab_size :].any()
    assert not allowed[eos].any()  # nothing written yet: the regex does not accept the empty string
    constraint.accept(model.tokenizer.encode("ab")[0])
    allowed = constraint.allowed()
    assert allowed[eos].all() and not allowed[model.tokenizer.vocab_size :].any()
    any_json = compiler.constraint(GrammarSpec("json_schema", {"type": "object"})).allowed()
    assert not any_json[model.tokenizer.vocab_size :].any() and not any_json[eos].any()


def test_uncompilable_grammars_are_named(model):
    compiler = model.grammar_compiler
    for spec, words in [
        (GrammarSpec("json_schema", {"type": "strin"}), "JSON schema cannot be compiled: Invalid type"),
        (GrammarSpec("json_schema", {"properties": {"a": {"$ref": "#/defs/nope"}}}), "/defs/nope"),
        (GrammarSpec("regex", "(unclosed"), "regex cannot be compiled"),
        (GrammarSpec("lark", "start: missing_rule"), "grammar cannot be compiled"),
        (GrammarSpec("choice", []), "non-empty list"),
    ]:
        with pytest.raises(GrammarError, match=words):
            compiler.constraint(spec)
    with pytest.raises(GrammarError, match="tools' parameter schemas"):
        bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
        compiler.constraint(GrammarSpec("tool_calls", ToolCallGrammar((bad_tool,))))


def test_model_api_follows_the_schema_from_random_weights(model):
    for seed in range(3):
        result = model.chat(MESSAGES, json_schema=SCHEMA, temperature=1.0, seed=seed, max_tokens=120)
        assert result.finish_reason == "stop", result.text
        assert_valid(json.loads(result.text))
    assert model.chat(MESSAGES, regex=r"[0-9]{3}-[a-z]{2}", temperature=1.0, seed=1, max_tokens=20).text[3] == "-"
    assert model.chat(MESSAGES, choice=["yes", "no"], max_tokens=8).text in ("yes", "no")
    with pytest.raises(RequestError, match="one output constraint"):
        model.chat(MESSAGES, regex="a", choice=["a"])
    with pytest.raises(RequestError, match="ignore_eos"):
        model.chat(MESSAGES, regex="a+", ignore_eos=True)


def test_model_api_tool_calls(model):
    result = model.chat(
        MESSAGES, tools=[WEATHER, CLOCK], tool_choice="required", temperature=1.0, seed=4, max_tokens=80
    )
    assert result.finish_reason == "tool_calls" and result.tool_calls and result.content is None
    for call in result.tool_calls:
        assert call.name in ("get_weather", "get_time")
        if call.name == "get_weather":
            arguments = json.loads(call.arguments)
            assert arguments["city"] in ("Paris", "Zürich", "東京") and 1 <= arguments["days"] <= 7
    named = {"type": "function", "function": {"name": "get_time"}}
    result = model.chat(MESSAGES, tools=[WEATHER, CLOCK], tool_choice=named, max_tokens=40)
    assert [(call.name, call.arguments) for call in result.tool_calls] == [("get_time", "{}")]


def test_a_constrained_row_leaves_the_others_as_they_are_alone(model):
    """Greedy plain requests give the same tokens alone and batched beside constrained ones."""
    prompts = [model.prepare([{"role": "user", "content": text}]) for text in ("One.", "Two, please.", "Three")]

    def run(with_grammar: bool) -> list[list[int]]:
        engine = BatchEngine(model, max_batch=4)
        try:
            plain = [engine.submit(prompt, temperature=0, max_tokens=16, ignore_eos=True) for prompt in prompts]
            if with_grammar:
                for seed in range(2):
                    constrained = model.constraint(GrammarSpec("json_schema", SCHEMA))
                    engine.submit(prompts[0], constraint=constrained, temperature=1.0, seed=seed, max_tokens=60)
            return [handle.result().token_ids for handle in plain]
        finally:
            engine.shutdown()

    assert run(True) == run(False)


# -- the server, with the openai client ------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_is_followed_from_random_weights(client, stream):
    for seed in range(2):
        options = dict(model="tiny", messages=MESSAGES, response_format=schema_format(), temperature=1.0, seed=seed)
        if stream:
            chunks = list(client.chat.completions.create(**options, max_tokens=120, stream=True))
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            choice = client.chat.completions.create(**options, max_tokens=120).choices[0]
            text, finish = choice.message.content, [choice.finish_reason]
        assert finish == ["stop"], text
        assert_valid(json.loads(text))


def test_parse_with_a_pydantic_model(client):
    class Row(BaseModel):
        level: int = Field(ge=0, le=9)
        ok: bool

    class Form(BaseModel):
        colour: Literal["red", "green"]
        rows: list[Row] = Field(max_length=2)

    completion = client.chat.completions.parse(
        model="tiny", messages=MESSAGES, response_format=Form, temperature=1.0, seed=3, max_tokens=100
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Form) and parsed.colour in ("red", "green")


def test_json_object_and_structured_outputs(client):
    # any JSON object: with random weights it may run long, so only its start is checked
    chunk = client.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format={"type": "json_object"}, max_tokens=3, temperature=0
    )
    assert chunk.choices[0].message.content.startswith("{")
    extra = [
        ({"regex": "[0-9]{2}:[0-9]{2}"}, lambda text: len(text) == 5 and text[2] == ":"),
        ({"choice": ["alpha", "beta", "gamma"]}, lambda text: text in ("alpha", "beta", "gamma")),
        ({"grammar": 'start: "say " ("yes" | "no")'}, lambda text: text in ("say yes", "say no")),
        ({"grammar": 'root ::= "a" [0-9] "z"'}, lambda text: len(text) == 3 and text[0] == "a" and text[2] == "z"),
        ({"json": json.dumps(SCHEMA)}, lambda text: assert_valid(json.loads(text)) is None),
    ]
    for outputs, check in extra:
        response = client.chat.completions.create(
            model="tiny", messages=MESSAGES, temperature=1.0, seed=5, max_tokens=120,
            extra_body={"structured_outputs": outputs},
        )  # fmt: skip
        text = response.choices[0].message.content
        assert response.choices[0].finish_reason == "stop" and check(text), (outputs, text)
    completion = client.completions.create(
        model="tiny", prompt="Answer:", max_tokens=120, temperature=1.0, seed=2,
        extra_body={"response_format": schema_format()},
    )  # fmt: skip
    assert_valid(json.loads(completion.choices[0].text))


def test_grammar_errors_are_400s_naming_the_problem(server):
    def post(body):
        return requests.post(server.base_url + "/v1/chat/completions", json={"messages": MESSAGES, **body}, timeout=60)

    for body, param, words in [
        ({"response_format": schema_format({"type": "object", "properties": {"a": {"type": "strin"}}})},
         "response_format", "Invalid type: strin"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "Field required"),
        ({"response_format": {"type": "xml"}}, "response_format", "does not match"),
        ({"structured_outputs": {"regex": "(a"}}, "structured_outputs", "regex cannot be compiled"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", "Extra"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
         "not both"),
        ({"response_format": {"type": "json_object"}, "tools": [WEATHER]}, "response_format", "cannot be combined"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, None, "ignore_eos"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}, "tools",
         "cannot be compiled"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         "no tool named 'nope'"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type", "'function'"),
    ]:  # fmt: skip
        response = post(body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert words in error["message"] and (error["param"] or "").startswith(param or ""), (body, error)
        assert (param is None) == (error["param"] is None), (body, error)


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_calls_from_random_weights(client, stream):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, parallel in (("required", True), ("required", False), (named, None)):
        options = dict(model="tiny", messages=MESSAGES, tools=[WEATHER, CLOCK], tool_choice=choice, max_tokens=100)
        if parallel is not None:
            options["parallel_tool_calls"] = parallel
        calls = stream_calls(client, options) if stream else whole_calls(client, options)
        assert calls and (len(calls) == 1 or parallel)
        for name, arguments in calls:
            assert name in ("get_weather", "get_time") and (choice == "required" or name == "get_weather")
            if name == "get_weather":
                assert set(json.loads(arguments)) == {"city", "days"}


def whole_calls(client, options) -> list[tuple[str, str]]:
    choice = client.chat.completions.create(**options, temperature=1.0, seed=7).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    return [(call.function.name, call.function.arguments) for call in choice.message.tool_calls]


def stream_calls(client, options) -> list[tuple[str, str]]:
    chunks = list(client.chat.completions.create(**options, temperature=1.0, seed=7, stream=True))
    calls: dict[int, list] = {}
    for chunk in chunks:
        delta = chunk.choices[0].delta if chunk.choices else None
        assert delta is None or not delta.content  # no tag text, no content
        for item in (delta.tool_calls or []) if delta else []:
            if item.id is not None:
                assert item.index not in calls and item.function.name and item.type == "function"
                calls[item.index] = [item.function.name, item.function.arguments or ""]
            else:
                calls[item.index][1] += item.function.arguments or ""
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"]
    return [tuple(calls[index]) for index in sorted(calls)]


def test_tool_choice_none_and_auto_without_a_call(client, model):
    """none: no tools in the prompt and plain text back; auto with a model that writes no tag: text."""
    none = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0
    )
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    auto = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER], max_tokens=8, temperature=0)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # the tool section is in the prompt
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].finish_reason == "length"


def test_logit_bias(client, server, model):
    token = model.tokenizer.encode(" banana")[0]
    response = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=3, temperature=0, logit_bias={str(token): 100}
    )
    assert response.choices[0].message.content == " banana" * 3
    body = {"messages": MESSAGES, "logit_bias": {"999999": 1}}
    too_far = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert too_far.status_code == 400 and too_far.json()["error"]["param"] == "logit_bias"


def test_tools_need_a_tool_section(make_vl):
    """The tiny Qwen2-VL checkpoint ships only the vision template: tools are a clear 400."""
    vl = qwenvl.load(make_vl("default"), dtype="float32")
    with pytest.raises(RequestError, match="has no tool section"):
        vl.prepare(MESSAGES, tools=[WEATHER])
    with live_server(vl) as running:
        body = {"messages": MESSAGES, "tools": [WEATHER], "max_tokens": 2}
        response = requests.post(running.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and "no tool section" in response.json()["error"]["message"]


# -- the command line ---------------------------------------------------------------------------------


def test_cli_json_schema_regex_and_tools(make_qwen2, tmp_path, capsys):
    from qwenvl.cli import main

    directory = str(make_qwen2("default"))
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    base = ["run", directory, "-p", "Fill in the form.", "--dtype", "float32", "--temperature", "1", "--seed", "3"]
    assert main(base + ["--json-schema", str(schema_file), "-n", "120"]) == 0
    assert_valid(json.loads(capsys.readouterr().out))
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([WEATHER, CLOCK]))
    assert main(base + ["--tools", str(tools_file), "--tool-choice", "get_weather", "--json", "-n", "60"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["finish_reason"] == "tool_calls" and record["content"] is None
    (call,) = record["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city", "days"}
    for argv, words in [
        (["--json-schema", str(tmp_path / "missing.json")], "cannot read"),
        (["--json-schema", str(tools_file)], "JSON object"),
        (["--tool-choice", "required"], "goes with --tools"),
        (["--regex", "(unclosed"], "regex cannot be compiled"),
    ]:
        assert main(base + argv) == 2
        assert words in capsys.readouterr().err
