"""Request fields the server knows but cannot honour: a 400 naming the field, never a silent drop.

Each entry: the field, when its value is harmless (the default, or a value that asks for nothing this
server does not do), and why it is refused. Fields outside this table and outside the schema are
unknown vendor fields and stay ignored. docs/serve.md lists the decision for every field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import APIError


def _absent(value: Any) -> bool:
    return value is None


def _falsy(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == {} or value == ""


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in allowed


# field → (is the value harmless?, why the field is refused)
OPENAI_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "audio": (_absent, "audio output is not supported (text only)"),
    "modalities": (lambda v: v is None or v == ["text"], "only the text modality is supported"),
    "prediction": (_absent, "predicted outputs are not supported"),
    "functions": (_absent, "the deprecated functions field is not supported: send tools"),
    "function_call": (_absent, "the deprecated function_call field is not supported: send tool_choice"),
    "store": (_falsy, "this server stores no completions"),
    "service_tier": (_one_of("auto", "default"), "only the default service tier exists here"),
    "reasoning_effort": (_absent, "this model has no reasoning effort setting"),
    "verbosity": (_absent, "this model has no verbosity setting"),
    "web_search_options": (_absent, "web search is not supported"),
    "prompt_cache_retention": (_one_of("in_memory", "in-memory"), "prompts are not cached beyond memory"),
}

# vLLM's extensions that would change the answer: refused rather than ignored
VLLM_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "guided_json": (_absent, "send structured_outputs: {'json': ...} or response_format"),
    "guided_regex": (_absent, "send structured_outputs: {'regex': ...}"),
    "guided_choice": (_absent, "send structured_outputs: {'choice': [...]}"),
    "guided_grammar": (_absent, "send structured_outputs: {'grammar': ...}"),
    "guided_decoding_backend": (_absent, "the grammar engine is llguidance"),
    "guided_whitespace_pattern": (_absent, "not supported"),
    "min_tokens": (_falsy, "not supported"),
    "stop_token_ids": (_falsy, "not supported: send stop strings"),
    "bad_words": (_falsy, "not supported: send logit_bias"),
    "allowed_token_ids": (_absent, "not supported: send logit_bias"),
    "use_beam_search": (_falsy, "beam search is not supported"),
    "length_penalty": (_one_of(1, 1.0), "beam search is not supported"),
    "include_stop_str_in_output": (_falsy, "not supported"),
    "skip_special_tokens": (_one_of(True), "special tokens are always skipped"),
    "spaces_between_special_tokens": (_one_of(True), "not supported"),
    "prompt_logprobs": (_absent, "not supported: send echo with logprobs to /v1/completions"),
    "truncate_prompt_tokens": (_absent, "prompts are never truncated"),
    "logits_processors": (_absent, "not supported"),
    "priority": (_falsy, "requests are served in arrival order"),
}

CHAT_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "echo": (_falsy, "echo is a /v1/completions field"),
    "best_of": (_one_of(1), "not supported"),
    "chat_template": (_absent, "the model's own chat template is used"),
    "chat_template_kwargs": (_falsy, "not supported"),
    "add_generation_prompt": (_one_of(True), "not supported"),
    "continue_final_message": (_falsy, "not supported"),
    "documents": (_absent, "not supported"),
}

COMPLETION_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "suffix": (_falsy, "suffix (fill-in-the-middle) is not supported"),
    "best_of": (_one_of(1), "only best_of=1"),
    "tools": (_absent, "tools are a /v1/chat/completions field"),
    "tool_choice": (_absent, "tools are a /v1/chat/completions field"),
    "top_logprobs": (_absent, "give the number of alternatives as logprobs (an integer) on /v1/completions"),
}


def refuse_fields(body: Any, chat: bool) -> None:
    """400 for the first refused field the body carries with a value the server cannot honour."""
    values = {**(body.model_extra or {}), **{name: getattr(body, name) for name in type(body).model_fields}}
    tables = (CHAT_FIELDS if chat else COMPLETION_FIELDS, OPENAI_FIELDS, VLLM_FIELDS)
    for table in tables:
        for name, (harmless, reason) in table.items():
            if name in values and not harmless(values[name]):
                raise APIError(400, f"{name} is not supported by this server: {reason}", param=name)
