"""Request and response bodies of the OpenAI-compatible endpoints (pydantic models; they make the OpenAPI schema).

Unknown top-level fields are ignored, as OpenAI-compatible servers do, except the ones listed in
``refusals.py``: fields of the OpenAI (or vLLM) schema that the server cannot honour are refused with a
400 naming them (docs/serve.md has the table).
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


class FunctionCall(_Body):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCallItem(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: rendered as system
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers


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


# -- tools, structured outputs, logprobs ---------------------------------------------------------------


class FunctionSpec(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; the arguments follow it when calls are constrained
    strict: bool | None = None  # calls are always grammar-constrained (required / named / after <tool_call>)


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(_Closed):
    type: Literal["text"]


class JSONObjectFormat(_Closed):
    type: Literal["json_object"]


class JSONSchemaSpec(_Closed):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the schema is always enforced


class JSONSchemaFormat(_Closed):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class StructuredOutputs(_Closed):
    """vLLM's ``structured_outputs`` extra body: one of ``json`` (a schema, as an object or JSON text),
    ``regex``, ``choice``, ``grammar`` (Lark or GBNF), ``json_object``."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None


LogitBias = dict[Annotated[str, Field(pattern=r"^[0-9]{1,7}$")], Annotated[float, Field(ge=-100, le=100)]]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]


class _StructuredFields(BaseModel):
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    logit_bias: LogitBias | None = None
    # accepted, with no effect on the answer (docs/serve.md: "Request fields, one by one")
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class ChatCompletionRequest(_StructuredFields, SamplingFields):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # extras: checked against refusals.py
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    mm_processor_kwargs: MultimodalOptions | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None


class CompletionRequest(_StructuredFields, SamplingFields):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # extras: checked against refusals.py
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None


# -- responses ------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str  # stop, length or tool_calls
    logprobs: ChatLogprobs | None = None


class ImageSize(BaseModel):
    width: int
    height: int


class ImageInfo(BaseModel):
    """One image of the prompt: its size as sent (after EXIF rotation) and the size the model saw."""

    index: int
    original: ImageSize
    resized: ImageSize


class GroundingBox(BaseModel):
    """A box (``box`` = [x1, y1, x2, y2]) or point (``point`` = [x, y]) in the original image's pixels."""

    image: int
    kind: Literal["box", "point"]
    label: str | None
    box: list[float] | None = None
    point: list[float] | None = None
    raw: list[float]
    convention: Literal["normalized_1000", "resized_pixels"]
    clamped: bool
    outside: bool


class QwenVLExtension(BaseModel):
    """qwenvl's additions to a chat answer (OpenAI clients ignore them): docs/grounding.md."""

    images: list[ImageInfo]
    boxes: list[GroundingBox]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    qwenvl: QwenVLExtension | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


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


class TokenizeRequest(_Closed):
    """vLLM's /tokenize: ``prompt`` (text, tokenized as is) or ``messages`` (rendered by the chat template,
    images and videos counted as the pad tokens they become)."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True  # Qwen tokenizers add none either way
    add_generation_prompt: bool = True
    tools: list[ToolSpec] | None = None
    return_token_strs: bool = False
    mm_processor_kwargs: MultimodalOptions | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Closed):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
