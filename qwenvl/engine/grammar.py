"""Constrained decoding with llguidance: grammars compiled once per request, a token mask per step.

``GrammarCompiler`` (one per model) wraps llguidance's view of the tokenizer (built once, ~1.5 s) and
turns a ``GrammarSpec`` (JSON schema, regex, choice list, Lark / GBNF grammar, or the hermes tool-call
grammar) into llguidance's grammar text, refusing what does not compile with a ``GrammarError`` that
names the problem. ``Constraint`` is one request's state: its matcher and, for a lazy grammar (tool
calls in ``auto`` mode), the trigger token that switches it on. The engine asks a constraint for the
allowed-token mask before sampling and tells it the token sampled; a request without one pays nothing.

The model's vocabulary (151,936 ids) is wider than the tokenizer's (151,665): llguidance gets the
model's width, and ids that no token stands for are never allowed. EOS is allowed only where the
grammar accepts.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import RequestError

# JSON as the model saw it in its training and in the chat template (json.dumps' separators); one
# fixed spelling also keeps a weak model from padding its answer with whitespace forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GRAMMAR_KINDS = ("json_schema", "regex", "choice", "lark", "gbnf", "tool_calls")


class GrammarError(RequestError):
    """A grammar, schema or regex that cannot be compiled (the message names the problem)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to.

    ``kind``: "json_schema" (``value``: a schema dict; ``{"type": "object"}`` for any object), "regex"
    (a pattern string), "choice" (a list of strings), "lark" or "gbnf" (grammar text), or "tool_calls"
    (``value``: a ``ToolCallGrammar``).
    """

    kind: str
    value: Any


@dataclass(frozen=True)
class ToolCallGrammar:
    """Hermes tool calls: ``<tool_call>\\n{"name": …, "arguments": …}\\n</tool_call>``, one or more.

    ``tools``: the request's function tools (OpenAI shape); ``parallel``: more than one call allowed;
    ``lazy``: the grammar starts after the model writes the opening tag itself (``tool_choice`` auto),
    otherwise the answer must be tool calls from its first token (required / a named function).
    """

    tools: tuple[dict, ...]
    parallel: bool = True
    lazy: bool = False


def structured_spec(
    json_schema: Any = None, regex: Any = None, choice: Any = None, grammar: Any = None
) -> GrammarSpec | None:
    """The one output constraint given (vLLM's structured_outputs names), None if none; GrammarError if
    more than one. ``json_schema``: a schema dict (``{"type": "object"}``: any JSON object)."""
    given = {name: value for name, value in (("json", json_schema), ("regex", regex), ("choice", choice),
                                              ("grammar", grammar)) if value is not None}  # fmt: skip
    if len(given) > 1:
        raise GrammarError(f"give one output constraint, not {' and '.join(given)}")
    if not given:
        return None
    ((name, value),) = given.items()
    return GrammarSpec({"json": "json_schema", "grammar": "lark"}.get(name, name), value)


class GrammarCompiler:
    """Compiles grammars for one tokenizer and model vocabulary (thread-safe; llguidance's tokenizer is
    built on first use)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(
                    self.tokenizer.to_json(),
                    n_vocab=self.vocab_size,
                    eos_token=list(self.eos_token_ids) or None,
                )
            return self._ll_tokenizer

    def tag_ids(self) -> tuple[int | None, int | None]:
        """The ids of ``<tool_call>`` and ``</tool_call>`` when they are single tokens (Qwen2.5's)."""
        return self.tokenizer.token_to_id("<tool_call>"), self.tokenizer.token_to_id("</tool_call>")

    def compile(self, spec: GrammarSpec) -> str:
        """llguidance's grammar for ``spec``, validated against this tokenizer; GrammarError if it fails."""
        import llguidance

        grammar = self._grammar_text(spec)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if failed:
            raise GrammarError(f"{_describe(spec)} cannot be compiled: {_one_line(messages[0])}")
        return grammar

    def constraint(self, spec: GrammarSpec) -> Constraint:
        """A new request's state for ``spec`` (compiled here, so errors come before the request runs)."""
        import llguidance

        grammar = self.compile(spec)
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{_describe(spec)} cannot be compiled: {_one_line(matcher.get_error())}")
        trigger = None
        if spec.kind == "tool_calls" and spec.value.lazy:
            trigger = self.tag_ids()[0]
        return Constraint(matcher, self.vocab_size, trigger)

    # -- grammar text per kind --------------------------------------------------------------------
    def _grammar_text(self, spec: GrammarSpec) -> str:
        import llguidance

        kind, value = spec.kind, spec.value
        try:
            if kind == "json_schema":
                if not isinstance(value, dict):
                    raise GrammarError("a JSON schema must be an object")
                return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
            if kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(_string(value, "regex"))
            if kind == "choice":
                if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                    raise GrammarError("choice must be a non-empty list of strings")
                return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(v) for v in value))
            if kind in ("lark", "gbnf"):
                return llguidance.grammar_from("grammar", _string(value, "grammar"))
            if kind == "tool_calls":
                return llguidance.LLMatcher.grammar_from_lark(self._tool_call_lark(value))
        except (ValueError, TypeError) as error:
            raise GrammarError(f"{_describe(spec)} cannot be compiled: {_one_line(error)}") from None
        raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {', '.join(GRAMMAR_KINDS)}")

    def _tool_call_lark(self, calls: ToolCallGrammar) -> str:
        """Lark for hermes tool calls; each call's JSON is ``{"name": <one of the tools>, "arguments": <its
        parameters schema>}``, the tags are their single tokens where the vocabulary has them."""
        start_id, end_id = self.tag_ids()
        open_tag = f"<[{start_id}]>" if start_id is not None else json.dumps("<tool_call>")
        close_tag = f"<[{end_id}]>" if end_id is not None else json.dumps("</tool_call>")
        options = [_call_schema(tool) for tool in calls.tools]
        schema = {**(options[0] if len(options) == 1 else {"anyOf": options}), "x-guidance": JSON_OPTIONS}
        first = ("" if calls.lazy else f"{open_tag} ") + f'"\\n" call "\\n" {close_tag}'
        more = f' ("\\n" {open_tag} "\\n" call "\\n" {close_tag})*' if calls.parallel else ""
        return f"start: {first}{more}\ncall: %json {json.dumps(schema)}\n"


class Constraint:
    """One request's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher: Any, vocab_size: int, trigger: int | None = None):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.trigger = trigger  # a lazy grammar waits for this token; None: active from the start
        self.active = trigger is None
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self) -> np.ndarray | None:
        """A bool array [vocab] of the tokens the grammar allows next; None while it is not active."""
        if not self.active:
            return None
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self.matcher.is_error():
            raise GrammarError(f"the output grammar failed: {_one_line(self.matcher.get_error())}")
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size].view(np.bool_)

    def accept(self, token: int) -> None:
        """Advance past the sampled token (for a lazy grammar not yet on: switch it on at the trigger)."""
        if not self.active:
            self.active = token == self.trigger
            return
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the output grammar failed: {_one_line(self.matcher.get_error())}")


def apply_mask(logits: torch.Tensor, allowed: np.ndarray) -> torch.Tensor:
    """Logits [vocab] (float32) with every token the mask forbids at -inf. One single-threaded numpy
    pass: torch would split these 152k elements over its threads, which costs more than the work."""
    if not allowed.any():
        raise GrammarError("the output grammar allows no token here")
    values = logits.numpy()
    if allowed.shape[0] < values.shape[0]:
        allowed = np.concatenate([allowed, np.zeros(values.shape[0] - allowed.shape[0], dtype=np.bool_)])
    return torch.from_numpy(np.where(allowed[: values.shape[0]], values, np.float32(-np.inf)))


def _call_schema(tool: dict) -> dict:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise GrammarError(f"{what} must be a non-empty string")
    return value


def _describe(spec: GrammarSpec) -> str:
    return {
        "json_schema": "the JSON schema",
        "regex": "the regex",
        "choice": "the choice list",
        "lark": "the grammar",
        "gbnf": "the grammar",
        "tool_calls": "the tools' parameter schemas",
    }.get(spec.kind, "the grammar")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())[:500]
