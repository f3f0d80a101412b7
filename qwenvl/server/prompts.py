"""From a validated request body to what the engine takes: a prepared Prompt and sampling options."""

from __future__ import annotations

import threading
from typing import Any

from ..api import Model
from ..chat import normalize_messages
from ..engine.prompt import Prompt, build_prompt
from ..errors import RequestError
from .errors import APIError
from .fetch import MediaFetcher, media_parts
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from .settings import ServerSettings

SAMPLING_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                   "seed", "stop")  # fmt: skip


class PromptBuilder:
    """Turns request bodies into prompts for one model (fetching media under the server's rules)."""

    def __init__(self, model: Model, settings: ServerSettings):
        self.model = model
        self.settings = settings
        self.fetcher = MediaFetcher(settings)
        self._vision_lock = threading.Lock()  # one image/video encoding at a time (shared vision cache)

    # -- prompts (blocking: run in a worker thread) ---------------------------------------------
    def chat_prompt(self, body: ChatCompletionRequest) -> Prompt:
        messages = normalize_messages([message.model_dump(exclude_none=True) for message in body.messages])
        messages = self.fetcher.resolve_messages(messages)
        media = body.mm_processor_kwargs.model_dump(exclude_none=True) if body.mm_processor_kwargs else {}
        if not media_parts(messages):
            return self.model.prepare(messages, **media)
        with self._vision_lock:
            return self.model.prepare(messages, **media)

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


def refuse_unsupported(body: SamplingFields) -> None:
    """400 for the request fields this server cannot honour, rather than silently ignoring them."""
    if body.n != 1:
        raise APIError(400, f"n={body.n} is not supported: only n=1 (send several requests instead)", param="n")
    if body.logprobs not in (None, False, 0) or body.top_logprobs not in (None, 0):
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise APIError(400, "echo is not supported by this server", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported: only 1", param="best_of")
