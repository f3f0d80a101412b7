"""Request and response bodies of the OpenAI-compatible endpoints (pydantic models; they make the OpenAPI schema).

Unknown top-level fields are ignored, as OpenAI-compatible servers do; fields the server cannot honour
(``n`` > 1, ``logprobs``, ``echo``, ...) are refused with a 400 by the routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_STOP_STRINGS = 16

PositiveInt = Annotated[int, Field(ge=1)]
StopString = Annotated[str, Field(min_length=1)]
StopStrings = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# -- chat content -------------------------------------------------------------------------------


class MediaURL(_Body):
    url: str
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: MediaURL | str


class VideoPart(_Body):
    """A video; qwen-vl-utils' per-video keys (fps, nframes, max_pixels, ...) may sit beside ``video_url``."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: Literal["video_url"]
    video_url: MediaURL | str


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


# -- requests -------------------------------------------------------------------------------------


class StreamOptions(_Body):
    include_usage: bool = False


class MultimodalOptions(_Closed):
    """``mm_processor_kwargs`` (vLLM's name): image / video preprocessing overrides for this request."""

    min_pixels: PositiveInt | None = None
    max_pixels: PositiveInt | None = None
    fps: Annotated[float, Field(gt=0)] | None = None
    nframes: PositiveInt | None = None


class SamplingFields(_Body):
    model: str | None = None
    max_tokens: PositiveInt | None = None
    # Ranges as OpenAI documents its fields and vLLM its extensions (top_k, min_p, repetition_penalty);
    # finite values only (the body's allow_inf_nan=False). Outside: a 400 naming the field.
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 (vLLM) or 0: off
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stop: StopStrings | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM / llama.cpp extension: keep going past end-of-sequence (benchmarks)
    logprobs: Any = None
    top_logprobs: Any = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    mm_processor_kwargs: MultimodalOptions | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# -- responses ------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwenvl"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
