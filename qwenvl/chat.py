"""Chat messages → prompt text: validate and normalize messages, render the model's Jinja chat template.

Rendering follows transformers' `apply_chat_template(tokenize=False)` (utils/chat_template_utils.py):
the same sandboxed Jinja environment and globals, the same variables, the same clean-up of the inputs,
so a prompt built here is byte-identical to the one transformers builds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime
from importlib import resources
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import RequestError

ROLES = ("system", "user", "assistant", "tool")
MEDIA_TYPES = ("image", "video")
_CONTENT_KEYS = ("text", "image", "image_url", "video", "video_url")  # to infer a missing "type"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# ---- messages ----


def normalize_messages(messages: Any) -> list[dict]:
    """Validate messages and rewrite image/video items to `{"type": "image", "image": src}` form.

    Accepts OpenAI parts (`image_url` / `video_url`, url as a dict or a plain string) and HF parts
    (`image` / `url` / `path` keys); returns new dicts, the input is left untouched.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("messages: expected a non-empty list of message objects")
    return [_normalize_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def _normalize_message(message: Any, where: str) -> dict:
    if not isinstance(message, Mapping):
        raise RequestError(f"{where}: expected an object with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise RequestError(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}")
    content = message.get("content")
    if isinstance(content, (list, tuple)):
        content = [_normalize_item(item, f"{where}.content[{j}]") for j, item in enumerate(content)]
    elif content is not None and not isinstance(content, str):
        raise RequestError(f"{where}.content: expected a string, a list of parts or null")
    normalized = dict(message)
    if "content" in message:
        normalized["content"] = content
    return normalized


def _normalize_item(item: Any, where: str) -> dict:
    if not isinstance(item, Mapping):
        raise RequestError(f"{where}: expected an object with a 'type', got {type(item).__name__}")
    kind = item.get("type") or next((key for key in _CONTENT_KEYS if key in item), None)
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise RequestError(f"{where}.text: expected a string")
        return {**item, "type": "text"}
    if kind in ("image", "image_url"):
        return _media_item("image", item, where)
    if kind in ("video", "video_url"):
        return _media_item("video", item, where)
    raise RequestError(f"{where}.type: expected text, image, image_url, video or video_url, got {kind!r}")


def _media_item(kind: str, item: Mapping, where: str) -> dict:
    """`{"type": kind, kind: source}` plus the item's other options (e.g. max_pixels)."""
    openai_key = f"{kind}_url"
    if item.get(openai_key) is not None:
        wrapped = item[openai_key]
        source = wrapped.get("url") if isinstance(wrapped, Mapping) else wrapped
        if not isinstance(source, str):
            raise RequestError(f"{where}.{openai_key}: expected a url string or {{'url': ...}}")
    else:
        source = next((item[key] for key in (kind, "url", "path") if item.get(key) is not None), None)
    if source is None or (isinstance(source, str) and not source.strip()):
        raise RequestError(f"{where}: {kind} item has no source (give '{kind}', 'url', 'path' or '{openai_key}')")
    rest = {key: value for key, value in item.items() if key not in ("type", kind, "url", "path", openai_key)}
    return {"type": kind, kind: source, **rest}


def media_items(messages: Any) -> list[tuple[str, object]]:
    """("image" | "video", source) for every media part, in the order the template emits their pads."""
    found = []
    for message in normalize_messages(messages):
        content = message.get("content")
        if isinstance(content, list):
            found.extend((item["type"], item[item["type"]]) for item in content if item["type"] in MEDIA_TYPES)
    return found


# ---- rendering ----


def default_template() -> str:
    """Plain ChatML (text only), for models that ship no chat template — as llama.cpp falls back to."""
    return _template_file("chatml.jinja")


def _template_file(name: str) -> str:
    return resources.files("qwenvl").joinpath(f"templates/{name}").read_text(encoding="utf-8")


# Tokens that end a turn of the chat format an architecture falls back to: stop tokens whatever
# generation_config.json says (Qwen (v1)'s ChatML: its chat() and qwen.cpp stop on both).
CHAT_STOP_TOKENS = {"qwen": ("<|im_end|>", "<|endoftext|>")}


def fallback_template(arch: str) -> str | None:
    """The chat template of a model of ``arch`` that ships none: Qwen (v1)'s ChatML with its default
    system prompt (its make_context, qwen.cpp); plain ChatML for the Qwen2 family (llama.cpp's
    fallback); None for Llama-family models, whose base checkpoints have no chat format (raw prompts
    only: ``Model.encode_raw``)."""
    if arch == "qwen":
        return _template_file("qwen.jinja")
    if arch == "llama":
        return None
    return default_template()


def render_chat(
    template: str | None,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    tools: list | None = None,
    **extra: Any,
) -> str:
    """The prompt text, as transformers' `apply_chat_template(..., tokenize=False)` renders it.

    `extra` becomes template variables (e.g. bos_token / eos_token, add_vision_id, enable_thinking).
    """
    compiled = _compile(template if template is not None else default_template())
    chat = [_without_none(message) for message in _plain_data(normalize_messages(messages))]
    chat = _alias_reasoning_fields(chat)
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise RequestError("tools: expected a list of JSON-schema objects")
    try:
        return compiled.render(
            messages=chat,
            tools=_plain_data(tools),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **_plain_data(extra),
        )
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as error:
        # The template met data it does not accept (or called raise_exception): the request is at fault.
        raise RequestError(f"chat template: {_one_line(error)}") from None


@functools.lru_cache(maxsize=16)
def template_uses_tools(template: str | None) -> bool:
    """Whether a chat template renders the ``tools`` variable (has a tool section)."""
    if template is None:
        return False
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return False


def _without_none(message: dict) -> dict:
    # transformers drops None values (OpenAI's content=None, tool_calls=None): templates test for missing keys.
    return {key: value for key, value in message.items() if value is not None}


def _alias_reasoning_fields(chat: list[dict]) -> list[dict]:
    # As transformers does: reasoning under any of its names is exposed as reasoning_content and thinking.
    aliased = []
    for message in chat:
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _plain_data(value: Any) -> Any:
    """Rebuild the template's inputs out of JSON types; anything else (a PIL image, an array) becomes an
    inert "<TypeName>" string, as in transformers, so the sandbox never sees objects with methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_data(key): _plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_data(item) for item in value)
    if isinstance(value, np.generic):
        return _plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain_data(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise RequestError(f"chat template: syntax error on line {error.lineno}: {_one_line(error)}") from None


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Plain json.dumps: unlike Jinja's own tojson it does not HTML-escape, and keeps non-ASCII text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names (no route to CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` (used for assistant masks in training) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
