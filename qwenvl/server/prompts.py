"""From a validated request body to what the engine takes: a prepared Prompt, the output grammar
(structured outputs, tool calls) and sampling options."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..api import Model
from ..chat import normalize_messages
from ..engine.grammar import Constraint, GrammarError, GrammarSpec
from ..engine.prompt import Prompt, build_prompt
from ..errors import RequestError
from ..tools import resolve_tool_choice
from .errors import APIError
from .fetch import MediaFetcher
from .refusals import refuse_fields
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields, TokenizeRequest
from .settings import ServerSettings


@dataclass
class OutputPlan:
    """What a request's answer must follow: the tools shown to the template, the grammar (and the request
    field it comes from, for error messages), and whether tool calls are parsed out of the text."""

    tools: list[dict[str, Any]] | None = None
    grammar: GrammarSpec | None = None
    source: str | None = None
    parse_tools: bool = False


SAMPLING_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                   "seed", "stop")  # fmt: skip


class PromptBuilder:
    """Turns request bodies into prompts for one model (fetching media under the server's rules)."""

    def __init__(self, model: Model, settings: ServerSettings):
        self.model = model
        self.settings = settings
        self.fetcher = MediaFetcher(settings)

    # -- prompts (blocking: run in a worker thread) ---------------------------------------------
    def chat_prompt(self, body: ChatCompletionRequest, plan: OutputPlan | None = None) -> Prompt:
        """Fetch the media, decode them (concurrently with other requests) and encode them (one request
        at a time: the model's vision lock) into a prompt; the server's video limits apply."""
        messages = self.fetcher.resolve_messages(chat_messages(body.messages))
        media = body.mm_processor_kwargs.model_dump(exclude_none=True) if body.mm_processor_kwargs else {}
        tools = plan.tools if plan is not None else None
        return self.model.prepare(messages, tools=tools, **media, **self.settings.video_limits())

    def tokenize_messages(self, body: TokenizeRequest) -> list[int]:
        """/tokenize with messages: the ids the model would read, each image / video as its pad tokens."""
        assert body.messages is not None
        messages = self.fetcher.resolve_messages(chat_messages(body.messages))
        media = body.mm_processor_kwargs.model_dump(exclude_none=True) if body.mm_processor_kwargs else {}
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
        return self.model.prompt_ids(messages, tools=tools, add_generation_prompt=body.add_generation_prompt, **media)

    # -- the output: tools and structured outputs --------------------------------------------------
    def output_plan(self, body: ChatCompletionRequest | CompletionRequest) -> OutputPlan:
        """The grammar of ``response_format`` / ``structured_outputs`` / ``tools`` (at most one of them)."""
        plan = OutputPlan()
        for source, spec in _structured_specs(body):
            if plan.grammar is not None:
                raise APIError(400, "give one of response_format and structured_outputs, not both", param=source)
            plan.grammar, plan.source = spec, source
        if isinstance(body, ChatCompletionRequest) and (body.tools or body.tool_choice is not None):
            tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
            choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
            try:
                shown, calls = resolve_tool_choice(tools, choice, body.parallel_tool_calls)
            except RequestError as error:
                param = "tool_choice" if str(error).startswith("tool_choice") else "tools"
                raise APIError(400, str(error), param=param) from None
            if calls is not None and plan.grammar is not None:
                raise APIError(
                    400, f"{plan.source} cannot be combined with tools (unless tool_choice is none)", param=plan.source
                )
            plan.tools, plan.parse_tools = shown, calls is not None
            if calls is not None:
                plan.grammar, plan.source = calls, "tools"
        return plan

    def constraint(self, plan: OutputPlan) -> Constraint | None:
        """The request's grammar state (compiled now: a schema that does not compile is a 400)."""
        try:
            return self.model.constraint(plan.grammar)
        except GrammarError as error:
            raise APIError(400, f"{plan.source}: {error}", param=plan.source) from None

    def completion_prompt(self, body: CompletionRequest) -> Prompt:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported: send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):  # as-is, with BOS / EOS as the tokenizer adds them (a Llama's BOS)
            prompt = self.model.tokenizer.encode_raw(prompt)
        vocab = self.model.config.text.vocab_size
        bad = next((token for token in prompt if not 0 <= token < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        return build_prompt(prompt, [], self.model.config)  # refuses image/video placeholders: no media here

    # -- sampling -------------------------------------------------------------------------------
    def sampling(self, body: SamplingFields, prompt_tokens: int, requested: int | None) -> dict[str, Any]:
        """Engine options: the request's values (unset ones left to the model's defaults) and max_tokens."""
        options = {name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None}
        if body.top_k is not None:
            options["top_k"] = max(body.top_k, 0)
        if body.ignore_eos:
            options["ignore_eos"] = True
        options["max_tokens"] = self.max_tokens(prompt_tokens, requested)
        bias = getattr(body, "logit_bias", None)
        if bias:
            vocab = self.model.config.text.vocab_size
            options["logit_bias"] = {int(token): value for token, value in bias.items()}
            bad = next((token for token in options["logit_bias"] if token >= vocab), None)
            if bad is not None:
                raise APIError(
                    400, f"logit_bias: token id {bad} is outside the vocabulary (0..{vocab - 1})", param="logit_bias"
                )
        if isinstance(body, ChatCompletionRequest) and body.logprobs:
            options["logprobs"] = body.top_logprobs or 0
        if isinstance(body, CompletionRequest) and body.logprobs is not None:
            options["logprobs"] = body.logprobs
            if body.echo:
                options["prompt_logprobs"] = body.logprobs
        return options

    def max_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        context = self.model.context
        room = context - prompt_tokens
        if room <= 0:
            raise RequestError(f"the prompt has {prompt_tokens} tokens, the context holds {context}")
        if requested is None:
            return min(self.settings.default_max_tokens, room)
        if requested > room:
            raise APIError(
                400,
                f"max_tokens={requested} is beyond the context: the prompt has {prompt_tokens} tokens and the "
                f"context holds {context}, so at most {room} can be generated",
                param="max_tokens",
            )
        return requested


MAX_CHOICES = 16  # choices of one request (n); they share the prompt's KV blocks


def refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    """400 for the request fields this server cannot honour, rather than silently ignoring them."""
    if not 1 <= body.n <= MAX_CHOICES:
        raise APIError(400, f"n={body.n}: n must be 1 … {MAX_CHOICES}", param="n")
    refuse_fields(body, chat=isinstance(body, ChatCompletionRequest))
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Request messages as the chat template takes them: ``developer`` as ``system``, each tool call's
    arguments (JSON text in OpenAI's shape) as the object the templates render, tool results as text."""
    out = []
    for index, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        if item["role"] == "developer":
            item["role"] = "system"
        for number, call in enumerate(item.get("tool_calls") or []):
            function = call["function"]
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                where = f"messages.{index}.tool_calls.{number}.function.arguments"
                raise APIError(400, f"{where}: not valid JSON", param=where) from None
        if item["role"] == "tool" and isinstance(item.get("content"), list):
            item["content"] = "".join(part.get("text", "") for part in item["content"])
        out.append(item)
    return normalize_messages(out)


def _structured_specs(body: ChatCompletionRequest | CompletionRequest) -> list[tuple[str, GrammarSpec]]:
    """(request field, grammar) for ``response_format`` and ``structured_outputs``."""
    specs = []
    response_format = body.response_format
    if response_format is not None and response_format.type == "json_object":
        specs.append(("response_format", GrammarSpec("json_schema", {"type": "object"})))
    elif response_format is not None and response_format.type == "json_schema":
        schema = response_format.json_schema.schema_
        specs.append(("response_format", GrammarSpec("json_schema", schema if schema else {"type": "object"})))
    outputs = body.structured_outputs
    if outputs is not None:
        given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(outputs, name) is not None]
        given += ["json_object"] if outputs.json_object else []
        if len(given) != 1:
            raise APIError(
                400, "structured_outputs: give exactly one of json, regex, choice, grammar, json_object",
                param="structured_outputs",
            )  # fmt: skip
        specs.append(("structured_outputs", _structured_output(given[0], getattr(outputs, given[0]))))
    return specs


def _structured_output(name: str, value: Any) -> GrammarSpec:
    if name == "json_object":
        return GrammarSpec("json_schema", {"type": "object"})
    if name == "json_":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise APIError(
                    400, f"structured_outputs.json: not valid JSON ({error})", param="structured_outputs.json"
                )
        return GrammarSpec("json_schema", value)
    return GrammarSpec("lark" if name == "grammar" else name, value)
