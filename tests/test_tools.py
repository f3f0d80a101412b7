"""Hermes tool calls: the parser (whole and streamed in pieces of every size), tools / tool_choice
validation, and the chat templates' tool sections (no model runs here)."""

from __future__ import annotations

import json

import pytest
from checkpoints import TEMPLATES

from qwenvl.chat import render_chat
from qwenvl.errors import RequestError
from qwenvl.tokenizer import Tokenizer
from qwenvl.tools import ToolCallParser, check_tools, parse_tool_calls, resolve_tool_choice

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time"}}

QWEN25_TEMPLATE = TEMPLATES["qwen2"].read_text()
VL_TEMPLATE = TEMPLATES["qwen2_vl"].read_text()
TWO_CALLS = (
    "Let me look both up.\n\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Zürich", "days": {"n": 2}, "note": "}} </tool_call"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


def stream(text: str, size: int, finish: str = "stop") -> tuple[ToolCallParser, str, dict[int, dict]]:
    """Feed ``text`` in pieces of ``size`` characters; the parser, the content and each call's deltas."""
    parser = ToolCallParser()
    deltas = []
    for start in range(0, len(text), size):
        deltas += parser.feed(text[start : start + size])
    deltas += parser.finish(finish)
    content = "".join(delta.content or "" for delta in deltas)
    calls: dict[int, dict] = {}
    for delta in deltas:
        if delta.content is not None:
            continue
        call = calls.setdefault(delta.index, {"headers": [], "arguments": ""})
        if delta.name is not None:
            assert call["arguments"] == "", "the name comes before any argument fragment"
            call["headers"].append((delta.id, delta.name))
        call["arguments"] += delta.arguments or ""
    return parser, content, calls


def test_two_calls_whole():
    content, calls, malformed = parse_tool_calls(TWO_CALLS, "stop")
    assert not malformed and content == "Let me look both up."
    assert [call.name for call in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Zürich", "days": {"n": 2}, "note": "}} </tool_call"}
    assert calls[0].arguments == '{"city": "Zürich", "days": {"n": 2}, "note": "}} </tool_call"}'  # as written
    assert calls[1].arguments == "{}" and calls[0].id != calls[1].id and calls[0].id.startswith("call_")


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 11, 13, 40, 1000])
def test_split_tags_stream_the_same_answer(size):
    """Whatever the split, the content never holds tag text, each call's name comes once and first, and
    its fragments add up to the whole answer's arguments."""
    parser, content, calls = stream(TWO_CALLS, size)
    content_whole, whole, _ = parse_tool_calls(TWO_CALLS, "stop")
    assert content == content_whole and "<" not in content
    assert sorted(calls) == [0, 1]
    for index, call in calls.items():
        assert len(call["headers"]) == 1 and call["headers"][0][1] == whole[index].name
        assert call["arguments"] == whole[index].arguments
    assert [call.arguments for call in parser.calls] == [call.arguments for call in whole]


def test_arguments_stream_before_the_call_closes():
    parser = ToolCallParser()
    deltas = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert [d.name for d in deltas if d.name] == ["get_weather"]
    assert "".join(d.arguments or "" for d in deltas) == '{"city": "Par'
    deltas = parser.feed('is"}}\n</tool_call>')
    assert "".join(d.arguments or "" for d in deltas) == 'is"}'


def test_malformed_json_is_content_with_stop():
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call>'
    content, calls, malformed = parse_tool_calls(text, "stop")
    assert malformed and calls == [] and content == text
    for bad in ("<tool_call>not json</tool_call>", '<tool_call>{"arguments": 1, "name": "f"}</tool_call>',
                '<tool_call>{"name": "f", "arguments": {}, "extra": 1}</tool_call>', "Hi <tool_call> there"):  # fmt: skip
        assert parse_tool_calls(bad, "stop") == (bad, [], True)
    # streamed: the broken call comes back as content too (no call was announced for it)
    _, content, calls = stream("<tool_call>\nnot json\n</tool_call>", 3)
    assert content == "<tool_call>\nnot json\n</tool_call>" and calls == {}


def test_unicode_arguments_and_names():
    text = '<tool_call>\n{"name": "lookup", "arguments": {"q": "日本語 🤖 «x»", "e": "\\u00e9"}}\n</tool_call>'
    _, calls, _ = parse_tool_calls(text, "stop")
    assert json.loads(calls[0].arguments) == {"q": "日本語 🤖 «x»", "e": "é"}
    _, _, streamed = stream(text, 2)
    assert streamed[0]["arguments"] == calls[0].arguments


def test_arguments_as_a_json_string_and_keys_in_another_order():
    _, calls, _ = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "stop")
    assert json.loads(calls[0].arguments) == {"a": 1}
    _, calls, _ = parse_tool_calls('<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>', "stop")
    assert calls[0].name == "f" and json.loads(calls[0].arguments) == {"a": 1}


def test_text_without_calls_is_kept_exactly():
    for text in ("Plain answer.\n\n", "a < b and <tool", "   ", "x <tool_call"):
        content, calls, malformed = parse_tool_calls(text, "length")
        assert (content, calls, malformed) == (text, [], False)
        _, streamed, _ = stream(text, 1, "length")
        assert streamed == text


def test_a_call_cut_by_the_length_limit_stays_a_partial_call():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'
    content, calls, malformed = parse_tool_calls(text, "length")
    assert content is None and not malformed and calls[0].arguments == '{"city": "Pa'
    _, _, streamed = stream(text, 4, "length")
    assert streamed[0]["arguments"] == '{"city": "Pa'
    # cut before the name is complete: nothing to show, and no tag as content
    assert parse_tool_calls('<tool_call>\n{"na', "length") == ("", [], False)


def test_check_tools_and_tool_choice():
    assert check_tools([WEATHER, TIME]) == [WEATHER, TIME]
    for bad, words in [
        ([], "non-empty"),
        ([{"type": "custom", "custom": {"name": "x"}}], "only 'function'"),
        ([{"type": "function", "function": {"name": "bad name"}}], "letters"),
        ([WEATHER, WEATHER], "twice"),
        ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "JSON schema"),
    ]:
        with pytest.raises(RequestError, match=words):
            check_tools(bad)
    assert resolve_tool_choice([WEATHER], "none") == (None, None)
    shown, spec = resolve_tool_choice([WEATHER, TIME], None)
    assert shown == [WEATHER, TIME] and spec.value.lazy and spec.value.parallel
    _, spec = resolve_tool_choice([WEATHER, TIME], "required", parallel_tool_calls=False)
    assert not spec.value.lazy and not spec.value.parallel
    named = {"type": "function", "function": {"name": "get_time"}}
    _, spec = resolve_tool_choice([WEATHER, TIME], named)
    assert [tool["function"]["name"] for tool in spec.value.tools] == ["get_time"] and not spec.value.parallel
    with pytest.raises(RequestError, match="no tool named 'nope'"):
        resolve_tool_choice([WEATHER], {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(RequestError, match="tool_choice needs tools"):
        resolve_tool_choice(None, "required")
    with pytest.raises(RequestError, match="tool_choice: expected"):
        resolve_tool_choice([WEATHER], "sometimes")


def test_tool_template_falls_back_to_tokenizer_config(tokenizer_dir, tmp_path):
    """A Qwen2.5-VL-style checkpoint: chat_template.json without tools, tokenizer_config.json with them."""
    directory = tmp_path / "vl"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN25_TEMPLATE}))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": VL_TEMPLATE}))
    tokenizer = Tokenizer.from_dir(directory)
    assert tokenizer.chat_template == VL_TEMPLATE and tokenizer.tool_chat_template == QWEN25_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(directory).tool_chat_template is None


def test_history_with_tool_calls_renders_as_transformers(tokenizer_dir):
    """OpenAI-shaped history (arguments as JSON text, role tool) through the server's conversion renders
    exactly as transformers renders the same conversation with the arguments as objects."""
    from transformers import AutoTokenizer

    from qwenvl.server.prompts import chat_messages
    from qwenvl.server.schemas import ChatMessage

    openai_messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Zürich and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 °C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "10:00"}]},
    ]  # fmt: skip
    ours = render_chat(
        QWEN25_TEMPLATE, chat_messages([ChatMessage.model_validate(m) for m in openai_messages]), tools=[WEATHER, TIME]
    )
    hf_messages = [
        {"role": "system", "content": "Be brief."},
        openai_messages[1],
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
            {"type": "function", "function": {"name": "get_time", "arguments": {}}},
        ]},
        {"role": "tool", "content": "12 °C"},
        {"role": "tool", "content": "10:00"},
    ]  # fmt: skip
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = hf.apply_chat_template(
        hf_messages, tools=[WEATHER, TIME], chat_template=QWEN25_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert ours == expected
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in ours
    assert "<tool_response>\n10:00\n</tool_response>" in ours and "# Tools" in ours


NAMES = frozenset({"get_weather", "get_time"})


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_bare_json_calls_of_known_tools(size):
    """Small Qwen2.5-Coder models write calls without the tags: a whole answer made of objects naming a
    tool is calls; any other JSON stays content."""
    text = '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"name": "get_time", "arguments": {}}'
    content, calls, _ = parse_tool_calls(text, "stop", bare_names=NAMES)
    assert content is None and [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_time", "{}"),
    ]
    parser = ToolCallParser(bare_names=NAMES)
    deltas = [d for start in range(0, len(text), size) for d in parser.feed(text[start : start + size])]
    deltas += parser.finish("stop")
    assert not any(d.content for d in deltas) and [d.name for d in deltas if d.name] == ["get_weather", "get_time"]
    for other in ('{"name": "unknown", "arguments": {}}', '{"a": 1} and more', '{"name": "get_time", "arguments": {}'):
        assert parse_tool_calls(other, "stop", bare_names=NAMES) == (other, [], False)
        assert parse_tool_calls(other, "stop") == (other, [], False)
    # after a bare call, more text is content
    content, calls, _ = parse_tool_calls('{"name": "get_time", "arguments": {}}\nDone.', "stop", bare_names=NAMES)
    assert content == "Done." and len(calls) == 1


def test_a_complete_call_without_its_closing_tag():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n'
    for finish in ("length", "stop"):
        content, calls, malformed = parse_tool_calls(text, finish)
        assert not malformed and calls[0].arguments == '{"city": "Berlin"}', finish
