"""Tool calling in the hermes format of the Qwen2.5 / Qwen2-VL chat templates.

The model calls a tool by writing ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``
(one block per call). ``check_tools`` / ``resolve_tool_choice`` validate a request's ``tools`` and
``tool_choice`` (OpenAI's shapes) and say which grammar, if any, constrains the answer;
``ToolCallParser`` turns the generated text, whole or piece by piece, into content and calls: the
name of a call as soon as it is written, then its arguments in fragments, and never a tag in the content,
even when a tag arrives split over several pieces. A call whose JSON is malformed is returned as
content (with the finish reason the text had).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .engine.grammar import GrammarSpec, ToolCallGrammar
from .errors import RequestError

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
TOOL_CHOICES = ("none", "auto", "required")
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class ToolCall:
    """One parsed call: ``arguments`` is the JSON text of the arguments object, as the model wrote it."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolDelta:
    """A piece of parsed output: ``content`` text, or a call's header (``name`` set) or arguments fragment."""

    index: int = -1
    content: str | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


# -- requests: tools and tool_choice ------------------------------------------------------------------


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI function tools, validated: ``[{"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}]``. RequestError names the first problem."""
    if not isinstance(tools, list) or not tools:
        raise RequestError("tools: expected a non-empty list of {'type': 'function', 'function': {...}}")
    names = set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise RequestError(f"{where}.type: only 'function' tools are supported, got {kind!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"{where}.function: expected an object with a name")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise RequestError(f"{where}.function.name: expected 1-64 letters, digits, '_', '-' or '.', got {name!r}")
        if name in names:
            raise RequestError(f"{where}.function.name: {name!r} is given twice")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise RequestError(f"{where}.function.parameters: expected a JSON schema object")
    return tools


def resolve_tool_choice(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool | None = None
) -> tuple[list[dict[str, Any]] | None, GrammarSpec | None]:
    """The tools to show the template and the grammar that constrains the answer.

    ``none``: the tools are not shown (the model answers in text); ``auto`` (the default with tools):
    shown, and once the model opens a ``<tool_call>`` its JSON must be a valid call; ``required``: the
    answer is one or more calls; ``{"type": "function", "function": {"name": N}}``: exactly one call to N.
    """
    if tool_choice is not None and not tools:
        if tool_choice == "none":
            return None, None
        raise RequestError("tool_choice needs tools")
    if not tools:
        return None, None
    tools = check_tools(tools)
    choice = "auto" if tool_choice is None else tool_choice
    parallel = parallel_tool_calls is not False
    if choice == "none":
        return None, None
    if choice == "auto":
        return tools, GrammarSpec("tool_calls", ToolCallGrammar(tuple(tools), parallel=parallel, lazy=True))
    if choice == "required":
        return tools, GrammarSpec("tool_calls", ToolCallGrammar(tuple(tools), parallel=parallel))
    name = _named_choice(choice)
    chosen = [tool for tool in tools if tool["function"]["name"] == name]
    if not chosen:
        raise RequestError(f"tool_choice: no tool named {name!r} in tools")
    return tools, GrammarSpec("tool_calls", ToolCallGrammar(tuple(chosen), parallel=False))


def _named_choice(choice: Any) -> str:
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if isinstance(name, str):
            return name
    raise RequestError(
        "tool_choice: expected 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


# -- output: the hermes parser -------------------------------------------------------------------


@dataclass
class _OpenCall:
    index: int
    id: str
    text: str = ""  # the call's text so far, after the opening tag
    name: str | None = None  # set once the header is parsed (and announced)
    arguments_start: int = 0  # where the arguments begin in ``text``
    sent: int = 0  # characters of the arguments already sent as fragments


@dataclass
class ToolCallParser:
    """Feed generated text in pieces (``feed``), then ``finish``; each returns the deltas it completes.

    Content is held back while it could be the start of an opening tag, and whitespace around calls
    is dropped. Arguments are streamed as written, except the characters that may still be the call's
    closing brace. ``calls``, ``content`` and ``malformed`` hold the result.
    """

    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    malformed: bool = False
    # tool names: an answer that is a bare ``{"name": <one of them>, "arguments": {...}}`` object (as small
    # Qwen2.5-Coder models write calls, without the tags) is a call too; None: tags only
    bare_names: frozenset[str] | None = None
    _pending: str = ""  # text not handled yet (held-back content, or the start of a call's text)
    _call: _OpenCall | None = None
    _after_call: bool = False  # no content since the last call closed: leading whitespace is dropped

    def feed(self, text: str) -> list[ToolDelta]:
        deltas: list[ToolDelta] = []
        self._pending += text
        progress = True
        while self._pending and progress:
            if self._call is not None:
                progress = self._scan_call(deltas)
            elif self._bare_possible():
                progress = self._scan_bare(deltas)
            else:
                progress = self._scan_content(deltas)
        return deltas

    def finish(self, finish_reason: str | None = None) -> list[ToolDelta]:
        """Flush at the end of the output: held-back content, and an unclosed call (kept as a partial call
        when the output was cut by the length limit, else returned as content: malformed)."""
        deltas: list[ToolDelta] = []
        call, self._call = self._call, None
        if call is not None:
            call.text += self._pending
            self._pending = ""
            if _parse_call(call.text) is not None:  # complete but for the closing tag
                self._close(call, deltas)
            elif finish_reason != "length":
                self.malformed = True
                self._content(deltas, OPEN_TAG + call.text)
            elif call.name is not None:
                rest = call.text[call.arguments_start + call.sent :]
                if rest:
                    deltas.append(ToolDelta(call.index, arguments=rest))
                self.calls.append(ToolCall(call.id, call.name, call.text[call.arguments_start :]))
        pending, self._pending = self._pending, ""
        if pending and self._bare_possible():
            self.bare_names = None  # an object that never closed: text
            deltas += self.feed(pending)
            pending, self._pending = self._pending, ""
        self._content(deltas, pending.lstrip() if self._after_call else pending)
        return deltas

    # -- a bare call: the answer (or what follows a call) is a JSON object naming a tool --------------
    def _bare_possible(self) -> bool:
        if self.bare_names is None or (self.content and not self._after_call):
            return False
        return self._pending.lstrip().startswith("{")

    def _scan_bare(self, deltas: list[ToolDelta]) -> bool:
        """Hold the object until it closes; then it is a call (named tool, valid JSON) or content."""
        start = len(self._pending) - len(self._pending.lstrip())
        end = _object_end(self._pending, start)
        if end is None:
            return False
        text, self._pending = self._pending[start:end], self._pending[end:]
        parsed = _parse_call(text)
        if parsed is None or parsed[0] not in self.bare_names:
            self.bare_names = None  # plain JSON content: no more bare calls
            self._pending = text + self._pending
            return True
        call = _OpenCall(len(self.calls), f"call_{uuid.uuid4().hex[:24]}", text=text)
        self._close(call, deltas)
        return True

    # -- content: look for an opening tag -------------------------------------------------------------
    def _scan_content(self, deltas: list[ToolDelta]) -> bool:
        text = self._pending
        at = text.find(OPEN_TAG)
        if at >= 0:
            self._content(deltas, text[:at].strip() if self._after_call else text[:at].rstrip())
            self._pending = text[at + len(OPEN_TAG) :]
            self._call = _OpenCall(len(self.calls), f"call_{uuid.uuid4().hex[:24]}")
            return True
        safe = text[: len(text) - _partial_suffix(text, OPEN_TAG)].rstrip()  # whitespace waits for what follows
        self._pending = text[len(safe) :]
        self._content(deltas, safe.lstrip() if self._after_call else safe)
        return False

    def _content(self, deltas: list[ToolDelta], text: str) -> None:
        if text:
            self.content += text
            self._after_call = False
            deltas.append(ToolDelta(content=text))

    # -- a call: parse the header, stream the arguments, close -----------------------------------------
    def _scan_call(self, deltas: list[ToolDelta]) -> bool:
        call = self._call
        assert call is not None
        call.text += self._pending
        self._pending = ""
        close = call.text.find(CLOSE_TAG)
        body = call.text if close < 0 else call.text[:close]
        if call.name is None:
            self._announce(call, body, deltas)
        if close < 0:
            if call.name is not None and body[call.arguments_start :].startswith("{"):
                # everything but a trailing run of whitespace and braces (one of them closes the call)
                arguments = body[call.arguments_start :]
                arguments = re.sub(r"[\s}]*$", "", arguments[: len(arguments) - _partial_suffix(arguments, CLOSE_TAG)])
                if len(arguments) > call.sent:
                    deltas.append(ToolDelta(call.index, arguments=arguments[call.sent :]))
                    call.sent = len(arguments)
            return False
        self._pending = call.text[close + len(CLOSE_TAG) :]
        call.text = body
        self._call = None
        self._close(call, deltas)
        return True

    def _announce(self, call: _OpenCall, body: str, deltas: list[ToolDelta]) -> None:
        """Send the call's id and name once its header is written (and followed by the arguments)."""
        match = _HEADER.match(body)
        if match is None or len(body) == match.end():  # the arguments have not begun: the header may grow
            return
        try:
            name = json.loads(f'"{match.group(1)}"')
        except json.JSONDecodeError:
            return
        call.name, call.arguments_start = name, match.end()
        deltas.append(ToolDelta(call.index, id=call.id, name=name, arguments=""))

    def _close(self, call: _OpenCall, deltas: list[ToolDelta]) -> None:
        parsed = _parse_call(call.text)
        sent = call.text[call.arguments_start : call.arguments_start + call.sent]
        if parsed is None or (call.name is not None and parsed[0] != call.name) or not parsed[1].startswith(sent):
            self.malformed = True
            self._content(deltas, OPEN_TAG + call.text + CLOSE_TAG)
            return
        name, arguments = parsed
        if call.name is None:
            deltas.append(ToolDelta(call.index, id=call.id, name=name, arguments=""))
        if len(arguments) > call.sent:
            deltas.append(ToolDelta(call.index, arguments=arguments[call.sent :]))
        self.calls.append(ToolCall(call.id, name, arguments))
        self._after_call = True


def parse_tool_calls(
    text: str, finish_reason: str | None = None, bare_names: frozenset[str] | None = None
) -> tuple[str | None, list[ToolCall], bool]:
    """A whole answer → (content, calls, malformed). A malformed call leaves the whole text as content.
    ``bare_names``: see ``ToolCallParser``."""
    parser = ToolCallParser(bare_names=bare_names)
    parser.feed(text)
    parser.finish(finish_reason)
    if parser.malformed:
        return text, [], True
    if parser.calls:
        return parser.content or None, parser.calls, False
    return parser.content, [], False


def _parse_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a call's body, or None when it is not a valid call. The arguments
    are the text the model wrote when it wrote an object after the name, else re-serialized."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or set(value) - {"name", "arguments"}:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    match = _HEADER.match(text)
    if match is not None and text[match.end() :].startswith("{"):
        written = text.rstrip()[:-1].rstrip()[match.end() :]  # drop the call's closing brace
        try:
            if json.loads(written) == arguments:
                return value["name"], written
        except json.JSONDecodeError:
            pass
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def _object_end(text: str, start: int) -> int | None:
    """The index after the JSON object that opens at ``start`` (strings and escapes respected), or None
    while it is not closed."""
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def tool_names(tools: list[dict[str, Any]] | None) -> frozenset[str]:
    return frozenset(tool["function"]["name"] for tool in tools or ())


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
