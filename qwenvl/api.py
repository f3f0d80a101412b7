"""The public surface: ``qwenvl.load(...)`` → ``Model.chat`` / ``Model.stream``.

The CLI and the server call this module and nothing below it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import status
from .chat import fallback_template, media_items, normalize_messages, render_chat, template_uses_tools
from .config import GenerationConfig, ModelConfig, PreprocessConfig
from .engine.generate import Generation, GenerationResult, new_request
from .engine.grammar import Constraint, GrammarCompiler, GrammarSpec, structured_spec
from .engine.kv_cache import KVPool, default_budget_bytes
from .engine.prompt import EncodedVisual, Prompt, VisionCache, build_prompt
from .engine.sampler import sampling_params
from .engine.speculative import speculation
from .errors import MediaError, QwenVLError, RequestError
from .grounding import CONVENTIONS, GROUNDING_TOKENS, GroundedBox, ImageGeometry, ground, text_with_markers
from .media.image import ImageInput, load_image, preprocess_image
from .media.limits import LIMIT_OPTIONS as VIDEO_LIMIT_OPTIONS
from .media.limits import video_limits
from .media.video import REQUEST_OPTIONS as VIDEO_REQUEST_OPTIONS
from .media.video import VideoPlan, available_memory, decode_video, plan_video, video_options, vision_encoder_bytes
from .models.rope import IMAGE, VIDEO
from .models.text import TextModel
from .models.vision import VisionTransformer
from .quant.linear import KERNELS
from .quant.model import load_quantized_text
from .runtime import release_free_memory, resolve_dtype, set_threads
from .tokenizer import Tokenizer
from .tools import parse_tool_calls, resolve_tool_choice, tool_names
from .weights.checkpoint import Checkpoint, open_checkpoint
from .weights.layout import VISION_PREFIXES, layout_for

ChatResult = GenerationResult
DEFAULT_CONTEXT = 32768
MEDIA_OPTIONS = ("min_pixels", "max_pixels", *VIDEO_REQUEST_OPTIONS, *VIDEO_LIMIT_OPTIONS, "vision_memory_budget")
STRUCTURED_OPTIONS = ("json_schema", "regex", "choice", "grammar")
VIDEO_COST_HINT = (
    "lower it with --fps, --nframes, --video-max-pixels or --video-total-pixels "
    "(API: fps, nframes, video_max_pixels, video_total_pixels)"
)


@dataclass
class Model:
    """A loaded model: weights, tokenizer, chat template and defaults. Stateless between requests."""

    config: ModelConfig
    text_model: TextModel
    tokenizer: Tokenizer
    generation_config: GenerationConfig
    preprocess_config: PreprocessConfig
    chat_template: str | None  # None: the model has no chat format (a Llama base model): raw prompts only
    context: int
    source: str
    vision_model: VisionTransformer | None = None
    vision_cache: VisionCache = field(default_factory=VisionCache)
    _grammar_compiler: GrammarCompiler | None = field(default=None, repr=False)
    _grammar_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # One vision encoding at a time (the encoder and its cache are shared by the threads that call
    # prepare); loading, decoding and resizing media happen outside it.
    vision_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    kv_cache_mb: int | None = None  # the KV cache's budget (None: a share of the free memory, at first use)
    prefix_cache: bool = True  # requests reuse the cached keys/values of a shared prompt prefix
    _kv_pool: KVPool | None = field(default=None, repr=False, compare=False)
    _kv_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.dtype

    @property
    def kv_pool(self) -> KVPool:
        """The KV cache every request of this model takes its blocks from (engine/kv_cache.py), made
        at first use: ``kv_cache_mb`` MiB, or a share of the memory then available."""
        with self._kv_lock:
            if self._kv_pool is None:
                budget = self.kv_cache_mb * 2**20 if self.kv_cache_mb is not None else default_budget_bytes()
                self._kv_pool = KVPool(self.config.text, self.dtype, budget, prefix_caching=self.prefix_cache)
            return self._kv_pool

    def clear_caches(self) -> None:
        """Forget what earlier requests left for later ones: the prefix cache's blocks and the encoded
        images and videos. The next request runs cold (as after loading); running requests are unaffected."""
        with self.vision_lock:
            self.vision_cache.clear()
        with self._kv_lock:
            pool = self._kv_pool
        if pool is not None:
            pool.clear_prefixes()

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """Compiles this model's output grammars (structured outputs, tool calls); made on first use."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                eos = self.generation_config.eos_token_ids or _fallback_eos(self.tokenizer)
                self._grammar_compiler = GrammarCompiler(self.tokenizer, self.config.text.vocab_size, eos)
            return self._grammar_compiler

    def constraint(self, spec: GrammarSpec | None) -> Constraint | None:
        """A request's grammar state for ``spec`` (GrammarError, a RequestError, if it does not compile)."""
        return None if spec is None else self.grammar_compiler.constraint(spec)

    # -- prompts ------------------------------------------------------------------------------
    @property
    def tool_template(self) -> str | None:
        """The chat template that renders tools: the model's own, else the tokenizer's tool template."""
        if template_uses_tools(self.chat_template):
            return self.chat_template
        other = self.tokenizer.tool_chat_template
        return other if template_uses_tools(other) else None

    def _template(self, tools: list[dict[str, Any]] | None = None) -> str:
        if self.chat_template is None:
            raise RequestError(
                f"{Path(self.source).name} has no chat template (a base model): chat is refused; give it text "
                "as-is instead (qwenvl run --raw, the API's prepare_raw, or /v1/completions)"
            )
        if not tools:
            return self.chat_template
        template = self.tool_template
        if template is None:
            raise RequestError(
                f"the chat template of {Path(self.source).name} has no tool section: tools are not supported"
            )
        return template

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        return render_chat(
            self._template(tools),
            normalize_messages(messages),
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **self.tokenizer.special_tokens_map,
        )

    def prepare_raw(self, text: str) -> Prompt:
        """A prompt taken as-is, no chat template: the text's ids with BOS / EOS as the tokenizer's
        config asks (what a base model needs; transformers' ``tokenizer(text)``)."""
        return build_prompt(self.tokenizer.encode_raw(text), [], self.config)

    def prepare(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None, **media: Any
    ) -> Prompt:
        """Render the chat template, tokenize, encode the images and videos and assemble the prompt.

        ``tools``: OpenAI function tools for the template's tool section (the template of
        ``tool_template``; RequestError if the model has none).

        ``media`` takes per-request preprocessing overrides: ``min_pixels``, ``max_pixels`` (images);
        ``fps``, ``nframes``, ``video_start``, ``video_end``, ``video_min_pixels``, ``video_max_pixels``,
        ``video_total_pixels`` (videos; a video item's own keys such as ``"fps"`` win); ``vision_memory_budget``
        (bytes a video may take in the vision encoder; default: the memory available); ``max_video_frames``,
        ``max_video_seconds``, ``video_decode_timeout`` (how much of a video may be decoded, and for how
        long: docs/video.md). Videos are sized before decoding and refused when they would overflow these
        limits, the context or the memory budget. Only the encoding itself holds ``vision_lock``.
        """
        ids, prepared = self._tokenize_chat(messages, tools, media)
        prompt = build_prompt(ids, [self._encode_media(item) for item in prepared], self.config)
        prompt.images = _image_geometry(prepared)
        return prompt

    def prompt_ids(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **media: Any,
    ) -> list[int]:
        """The ids ``prepare`` would give, each image / video as its pad tokens, without running the vision
        encoder (images are resized, videos only planned): what a request's prompt costs, in tokens."""
        ids, prepared = self._tokenize_chat(messages, tools, media, add_generation_prompt)
        pads = (self.config.image_token_id, self.config.video_token_id)
        if sum(token in pads for token in ids) != len(prepared):
            raise RequestError(
                f"the prompt has {sum(t in pads for t in ids)} image/video placeholders for {len(prepared)} media"
            )
        counts = iter([_visual_tokens(item, self.preprocess_config.merge_size) for item in prepared])
        return [pad for token in ids for pad in ([token] * next(counts) if token in pads else [token])]

    def no_vision_message(self) -> str:
        """Why images and videos are refused: a text model, or a Qwen2-VL GGUF without its vision file."""
        name = self.source  # the server answers with its model name instead (server/errors.py)
        if self.config.arch in ("qwen2_vl", "qwen2_5_vl"):
            return (
                f"{name} is a Qwen2-VL model whose vision half is in another file: give its mmproj GGUF "
                "with --mmproj FILE (API: qwenvl.load(..., mmproj=FILE))"
            )
        return f"{name} is a text-only model: it cannot take images or videos"

    def _tokenize_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        media: dict[str, Any],
        add_generation_prompt: bool = True,
    ) -> tuple[list[int], list[ImageInput | VideoPlan]]:
        """The rendered prompt's ids (one placeholder per image / video) and the media, prepared."""
        messages = normalize_messages(messages)
        items = media_items(messages)
        if self.vision_model is None:
            if items:
                raise MediaError(self.no_vision_message())
            messages = [_flatten_text_parts(m) for m in messages]
        text = render_chat(
            self._template(tools),
            messages,
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            **self.tokenizer.special_tokens_map,
        )
        ids = self.tokenizer.encode(text)
        prepared = [
            self._prepare_media(kind, source, item, media)
            for (kind, source), item in zip(items, _media_parts(messages))
        ]
        self._check_visual_cost(ids, prepared, media.get("vision_memory_budget"))
        return ids, prepared

    def _prepare_media(
        self, kind: str, source: Any, item: dict[str, Any], media: dict[str, Any]
    ) -> ImageInput | VideoPlan:
        """An image preprocessed, or a video planned (frames and size chosen, nothing decoded yet)."""
        if kind == "video":
            return plan_video(source, self.preprocess_config, video_options(media, item), limits=video_limits(media))
        image_media = {k: media[k] for k in ("min_pixels", "max_pixels") if media.get(k) is not None}
        return preprocess_image(load_image(source), self.preprocess_config, **image_media)

    def _check_visual_cost(self, ids: list[int], prepared: list[ImageInput | VideoPlan], budget: int | None) -> None:
        """Refuse, before any decoding or encoding, a prompt whose media overflow the context or memory."""
        if not prepared:
            return
        merge = self.preprocess_config.merge_size
        visual = sum(_visual_tokens(item, merge) for item in prepared)
        placeholders = sum(1 for i in ids if i in (self.config.image_token_id, self.config.video_token_id))
        total = len(ids) - placeholders + visual
        if total >= self.context:
            videos = [item for item in prepared if isinstance(item, VideoPlan)]
            detail = "; ".join(f"{v.label}: {v.describe()} = {v.num_tokens} tokens" for v in videos)
            raise MediaError(
                f"the prompt would take {total} tokens ({visual} for images/videos{': ' + detail if detail else ''}), "
                f"the context holds {self.context}" + (f": {VIDEO_COST_HINT}" if videos else "")
            )
        budget = budget if budget is not None else available_memory()
        for item in prepared:
            if not isinstance(item, VideoPlan) or budget is None:
                continue
            assert self.config.vision is not None and self.vision_model is not None
            need = vision_encoder_bytes(item.num_patches, self.config.vision, self.vision_model.dtype)
            if need > budget:
                raise MediaError(
                    f"{item.label}: encoding {item.describe()} needs about {_bytes_text(need)}, "
                    f"more than the {_bytes_text(budget)} available: {VIDEO_COST_HINT}"
                )

    def _encode_media(self, item: ImageInput | VideoPlan) -> EncodedVisual:
        if isinstance(item, VideoPlan):
            video = decode_video(item)
            key = VisionCache.key(video.pixel_values, video.grid_thw)
            embeds = self.encode_pixels(video.pixel_values, video.grid_thw, key)
            return EncodedVisual(VIDEO, video.grid_thw, embeds, video.second_per_grid, digest=key)
        key = VisionCache.key(item.pixel_values, item.grid_thw)
        embeds = self.encode_pixels(item.pixel_values, item.grid_thw, key)
        return EncodedVisual(IMAGE, item.grid_thw, embeds, digest=key)

    def encode_pixels(
        self, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int], key: str | None = None
    ) -> torch.Tensor:
        """Vision-encoder embeddings of one preprocessed image or video (cached by content; ``key``:
        its ``VisionCache.key`` when already known)."""
        assert self.vision_model is not None
        vision = self.vision_model

        def compute() -> torch.Tensor:
            with torch.inference_mode():
                return vision(pixel_values.to(vision.dtype), [grid_thw])

        key = key or VisionCache.key(pixel_values, grid_thw)
        with self.vision_lock:
            return self.vision_cache.get_or_compute(key, compute)

    # -- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompt: Prompt | list[int],
        *,
        grammar: GrammarSpec | Constraint | None = None,
        speculative: str | None = None,
        spec_tokens: int | None = None,
        **sampling: Any,
    ) -> Generation:
        """Stream the continuation of a prepared prompt (or raw token ids). ``grammar``: what the output
        must follow (a ``GrammarSpec``, compiled here, or a ready ``Constraint``). ``speculative="ngram"``:
        prompt-lookup speculative decoding, drafting up to ``spec_tokens`` tokens a step (same output
        distribution; greedy gives the same tokens; docs/speculative.md)."""
        if not isinstance(prompt, Prompt):
            prompt = Prompt.text_only(list(prompt))
        spec = speculation(speculative, spec_tokens)
        params = sampling_params(self.generation_config, **sampling)
        eos = self.generation_config.eos_token_ids or _fallback_eos(self.tokenizer)
        constraint = self.constraint(grammar) if isinstance(grammar, GrammarSpec) else grammar
        request = new_request(
            self.text_model, self.tokenizer, prompt, params, eos, self.context, constraint=constraint, speculation=spec
        )

        def finish(result: GenerationResult) -> None:
            result.images, result.boxes = self.grounding(prompt, result.token_ids, result.text)

        return Generation(self.text_model, request, finish, pool=self.kv_pool)

    def grounding(
        self, prompt: Prompt, token_ids: list[int], text: str | None = None
    ) -> tuple[list[ImageGeometry], list[GroundedBox]]:
        """The prompt's images (original and resized sizes) and the boxes / points the answer names,
        mapped onto the last image's original pixels with the resize its preprocessing did
        (docs/grounding.md). ``text``: the answer as streamed (a stop string may have cut it)."""
        images = list(prompt.images)
        convention = CONVENTIONS.get(self.config.arch)
        if not images or convention is None:
            return images, []
        answer = text_with_markers(
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), token_ids, self._marker_ids(), text
        )
        return images, ground(answer, images, convention)

    def _marker_ids(self) -> dict[int, str]:
        ids = {self.tokenizer.token_to_id(token): token for token in GROUNDING_TOKENS}
        return {token_id: token for token_id, token in ids.items() if token_id is not None}

    def stream(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool | None = None,
        **options: Any,
    ) -> Generation:
        """Iterate for text pieces; the finished Generation's ``result`` holds ids, usage and timings.

        ``options``: sampling values (max_tokens, temperature, top_p, top_k, min_p, repetition_penalty,
        presence_penalty, frequency_penalty, seed, stop, logit_bias, logprobs; ``speculative="ngram"`` and
        ``spec_tokens``: see ``generate``), media preprocessing
        overrides (``MEDIA_OPTIONS``: see ``prepare``) and at most one output constraint
        (``STRUCTURED_OPTIONS``: ``json_schema`` a schema dict, ``regex`` a pattern, ``choice`` a list of
        strings, ``grammar`` a Lark or GBNF grammar). ``tools`` / ``tool_choice`` (``"auto"``, ``"none"``,
        ``"required"`` or ``{"type": "function", "function": {"name": …}}``) / ``parallel_tool_calls``:
        OpenAI's tool calling; the pieces are the raw text, tags included (``chat`` parses the calls).
        """
        media = {k: options.pop(k) for k in MEDIA_OPTIONS if options.get(k) is not None}
        options = {k: v for k, v in options.items() if k not in MEDIA_OPTIONS}
        structured = structured_spec(**{k: options.pop(k, None) for k in STRUCTURED_OPTIONS})
        shown, calls = resolve_tool_choice(tools, tool_choice, parallel_tool_calls)
        if structured is not None and calls is not None:
            raise RequestError("an output constraint (json_schema, regex, ...) cannot be combined with tools")
        return self.generate(self.prepare(messages, tools=shown, **media), grammar=structured or calls, **options)

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> ChatResult:
        """The whole answer at once: text, token ids, usage, finish reason and timings. With ``tools``
        (see ``stream``), ``tool_calls`` and ``content`` hold the parsed answer and ``finish_reason`` is
        ``"tool_calls"`` when the model called tools."""
        generation = self.stream(messages, **options)
        for _ in generation:
            pass
        result = generation.result
        assert result is not None
        return _parse_tools(result, options.get("tools"), options.get("tool_choice"))

    def chat_choices(self, messages: list[dict[str, Any]], n: int, **options: Any) -> list[ChatResult]:
        """``n`` whole answers to one conversation (OpenAI's ``n``), each as ``chat`` gives it: the prompt
        is prefilled once and the choices decode together on forks of its KV cache (shared blocks,
        copied when a choice first writes one). With a ``seed``, choice i samples with ``seed + i``.
        ``options`` as for ``chat``."""
        from .engine.scheduler import BatchEngine

        tools, tool_choice = options.pop("tools", None), options.pop("tool_choice", None)
        parallel = options.pop("parallel_tool_calls", None)
        media = {k: options.pop(k) for k in MEDIA_OPTIONS if options.get(k) is not None}
        options = {k: v for k, v in options.items() if k not in MEDIA_OPTIONS}
        structured = structured_spec(**{k: options.pop(k, None) for k in STRUCTURED_OPTIONS})
        shown, calls = resolve_tool_choice(tools, tool_choice, parallel)
        if structured is not None and calls is not None:
            raise RequestError("an output constraint (json_schema, regex, ...) cannot be combined with tools")
        prompt = self.prepare(messages, tools=shown, **media)
        spec = structured or calls
        constraints = [self.constraint(spec) for _ in range(n)] if spec is not None else None
        engine = BatchEngine(self, max_batch=n)
        try:
            results = [handle.result() for handle in engine.submit_choices(prompt, n, constraints, **options)]
        finally:
            engine.shutdown()
        for result in results:
            if result.finish_reason == "error":
                raise QwenVLError(result.error or "generation failed")
            result.images, result.boxes = self.grounding(prompt, result.token_ids, result.text)
        return [_parse_tools(result, tools, tool_choice) for result in results]


def _parse_tools(result: ChatResult, tools: list[dict[str, Any]] | None, tool_choice: Any) -> ChatResult:
    """With tools (and tool_choice not "none"): the calls and content parsed out of the answer."""
    if tools and tool_choice != "none":
        result.content, calls, _ = parse_tool_calls(result.text, result.finish_reason, bare_names=tool_names(tools))
        result.tool_calls = calls
        if calls and result.finish_reason == "stop":
            result.finish_reason = "tool_calls"
    return result


def _vision_only(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tensors of a checkpoint, without reading (or dequantizing) any text tensor."""
    return {name: tensors[name] for name in tensors if name.startswith(VISION_PREFIXES)}


def _flatten_text_parts(message: dict[str, Any]) -> dict[str, Any]:
    """Text-only templates expect string content: join a list of text parts into one string."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    return {**message, "content": "".join(part.get("text", "") for part in content)}


def _media_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each image/video part of normalized messages, in prompt order (as ``media_items`` lists them)."""
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts.extend(part for part in content if part.get("type") in ("image", "video"))
    return parts


def _image_geometry(prepared: list[ImageInput | VideoPlan]) -> tuple[ImageGeometry, ...]:
    """Each image's original and resized size, indexed among the images (videos skipped)."""
    images = [item for item in prepared if isinstance(item, ImageInput)]
    return tuple(ImageGeometry(index, *item.original_size, *item.resized_size) for index, item in enumerate(images))


def _visual_tokens(item: ImageInput | VideoPlan, merge: int) -> int:
    if isinstance(item, VideoPlan):
        return item.num_tokens
    t, h, w = item.grid_thw
    return t * h * w // (merge * merge)


def _bytes_text(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def _fallback_eos(tokenizer: Tokenizer) -> tuple[int, ...]:
    return tuple(i for i in (tokenizer.eos_token_id,) if i is not None)


def load(
    model: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    threads: int | None = None,
    context: int | None = None,
    mmproj: str | os.PathLike | None = None,
    kernel: str = "auto",
    exact_prefill: bool = False,
    tiktoken: str | os.PathLike | None = None,
    kv_cache_mb: int | None = None,
    prefix_cache: bool = True,
) -> Model:
    """Load a checkpoint directory, hub id, GGUF file or qwen.cpp GGML file (``None``: the embedded
    default model).

    ``mmproj``: the vision GGUF that goes with a Qwen2-VL / Qwen2.5-VL text GGUF.
    ``tiktoken``: the ``qwen.tiktoken`` a qwen.cpp file needs (it holds no vocabulary).
    ``kernel`` (GGUF files): "auto" keeps each weight in its GGML format with the format's default
    kernel; "dense" dequantizes everything to ``dtype`` at load; "blocks", "int8", "int4" force one
    kernel; "q8" keeps the exact block kernels for decoding and multiplies prompts with int8-quantized
    activations (llama.cpp's arithmetic, not exact; docs/quantization-kernels.md). ``exact_prefill``:
    with bf16 activations, multiply prompts by the exact quantized weights too (slower); by default
    prompts use the weights rounded to bf16, as a bf16 model does, and decoding is exact either way;
    with kernel="q8" it turns the int8 activations off (the exact "blocks" kernels throughout).
    ``kv_cache_mb``: the KV cache's budget in MiB (default: a quarter of the memory available when the
    first request runs); ``prefix_cache=False``: every request prefills its whole prompt (docs/engine.md).
    """
    if kv_cache_mb is not None and kv_cache_mb < 1:
        raise QwenVLError(f"kv_cache_mb must be at least 1, got {kv_cache_mb}")
    if kernel != "auto" and kernel not in KERNELS:
        raise QwenVLError(f"unknown kernel {kernel!r}; choose auto, {', '.join(KERNELS)}")
    set_threads(threads)
    if model is None:
        from .defaults import default_model_path

        model = default_model_path()
    with status.step(f"loading {Path(model).name if Path(model).expanduser().exists() else model}"):
        checkpoint = open_checkpoint(model, mmproj=mmproj, tiktoken=tiktoken)
        built = _build(checkpoint, resolve_dtype(dtype), context, kernel, exact_prefill)
    built.kv_cache_mb, built.prefix_cache = kv_cache_mb, prefix_cache
    return built


def _build(
    checkpoint: Checkpoint, dtype: torch.dtype, context: int | None, kernel: str = "auto", exact_prefill: bool = False
) -> Model:
    config = checkpoint.config
    with torch.device("meta"):
        text_model = TextModel(config.text)
    text_model = text_model.to(dtype)
    tensors = checkpoint.tensors()
    layout = layout_for(config.arch)
    if kernel == "q8" and exact_prefill:
        kernel = "blocks"  # --exact-prefill: no activation quantization
    if checkpoint.quantized is not None and kernel != "dense":
        pieces = None if exact_prefill or dtype == torch.float32 else 1
        load_quantized_text(text_model, checkpoint.quantized, dtype, kernel, prefill_pieces=pieces, layout=layout)
    else:
        text_model.load_weights(tensors, layout)
    text_model.eval()
    vision_model = None
    if config.vision is not None:
        with torch.device("meta"):
            vision_model = VisionTransformer(config.vision, dtype)
        vision_model = vision_model.to_empty(device="cpu")  # storage without random init
        vision_model.load_weights(_vision_only(tensors))
        vision_model.eval()
    del tensors
    release_free_memory()
    limit = config.text.max_position_embeddings
    if context is not None and context < 2:
        raise QwenVLError(f"context must be at least 2 tokens, got {context}")
    return Model(
        config=config,
        text_model=text_model,
        tokenizer=checkpoint.tokenizer,
        generation_config=checkpoint.generation_config,
        preprocess_config=checkpoint.preprocess_config,
        chat_template=checkpoint.chat_template
        if checkpoint.chat_template is not None
        else fallback_template(config.arch),
        context=min(context or DEFAULT_CONTEXT, limit),
        source=str(Path(checkpoint.source)),
        vision_model=vision_model,
    )
