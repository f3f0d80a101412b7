"""Prefill then one-token decode steps for one request, streamed as text pieces.

The pieces here (Request, prefill_chunk, accept_token, …) are shared with the batching engine
(scheduler.py), so a request gives the same tokens alone or in a batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import status
from ..errors import RequestError
from ..grounding import GroundedBox, ImageGeometry
from ..models.text import TextModel
from ..tokenizer import StreamDecoder, Tokenizer
from .grammar import Constraint, apply_mask
from .kv_cache import BlockSequence, KVPool, block_hashes
from .prompt import Prompt
from .sampler import Sampler, SamplingParams

if TYPE_CHECKING:
    from .speculative import Drafting, Speculation


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"; the engine adds "cancelled" and "error"
    prefill_s: float
    decode_s: float
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    error: str | None = None  # one-line message when finish_reason == "error"
    images: list[ImageGeometry] = field(default_factory=list)  # the prompt's images: original, resized size
    boxes: list[GroundedBox] = field(default_factory=list)  # boxes / points of the answer, original pixels
    logprobs: list[TokenLogprob] | None = None  # per generated token (a final EOS excepted), when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (None for the first)
    tool_calls: list | None = None  # qwenvl.tools.ToolCall list, when the request had tools (Model.chat)
    content: str | None = None  # with tools: the text outside the calls (None when there is none)
    draft_tokens: int = 0  # speculative decoding: tokens drafted (verified) in all
    accepted_tokens: int = 0  # speculative decoding: drafted tokens kept

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.completion_tokens - 1  # the first token comes out of the prefill
        return steps / self.decode_s if steps > 0 and self.decode_s else 0.0


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of the raw logits, before the sampling
    adjustments, penalties and grammar mask) and the ``top`` most likely tokens there, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Entries for ``tokens`` [N] from log-probabilities [N, vocab]."""
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    best_values, best_ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], tokens[:, None][:, :0])
    return [
        TokenLogprob(token, value, list(zip(ids, values)))
        for token, value, ids, values in zip(tokens.tolist(), chosen, best_ids.tolist(), best_values.tolist())
    ]


class StopMatcher:
    """Holds back text that may be the start of a stop string; cuts the text at the first match."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        buffer = self.pending + text
        hits = [buffer.find(stop) for stop in self.stops if stop in buffer]
        if hits:
            self.pending = ""
            return buffer[: min(hits)], True
        hold = max((_overlap(buffer, stop) for stop in self.stops), default=0)
        self.pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


# Prompts are prefilled in chunks of this many tokens (a chunk attends to the cache of the ones
# before). The batching engine runs other requests' decode steps between chunks.
PREFILL_CHUNK = 512


@dataclass
class Request:
    """Everything one generation owns: its prompt, KV cache, sampler and output so far."""

    prompt: Prompt
    params: SamplingParams
    eos_token_ids: frozenset[int]
    cache: BlockSequence | None  # None until allocated (a queued request of the batching engine) and once freed
    sampler: Sampler
    decoder: StreamDecoder
    stopper: StopMatcher
    max_new_tokens: int
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    constraint: Constraint | None = None  # the grammar the output must follow (structured outputs, tools)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when params.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # when params.prompt_logprobs is set
    rope_alpha: float = 1.0  # the model's rope factor for this prompt (Qwen's dynamic NTK), fixed at admission
    speculation: Speculation | None = None  # speculative decoding (engine/speculative.py), None: off
    draft_tokens: int = 0  # tokens drafted so far (speculation)
    accepted_tokens: int = 0  # drafted tokens kept so far (speculation)
    drafting: Drafting | None = None  # speculation: this request's adaptive draft length and pause
    _hashes: list[bytes] | None = field(default=None, repr=False)  # block_hashes, once computed

    @property
    def next_position(self) -> int:
        return len(self.prompt.input_ids) + len(self.output_ids) - 1 + self.prompt.rope_delta

    @property
    def next_start(self) -> int:
        """Cache index of the next decode step's token (the last one sampled)."""
        return len(self.prompt.input_ids) + len(self.output_ids) - 1

    def block_hashes(self, pool: KVPool) -> list[bytes]:
        """The hashes naming the prompt's full blocks in ``pool`` (kv_cache.block_hashes; [] when the
        pool caches no prefix or the prompt's visual items have no digest). Computed once."""
        if self._hashes is None:
            prompt = self.prompt
            shareable = prompt.visual_embeds is None or bool(prompt.visual_items)
            self._hashes = (
                block_hashes(
                    prompt.input_ids,
                    prompt.position_ids,
                    prompt.visual_items,
                    prompt.visual_token_ids,
                    seed=f"rope_alpha={self.rope_alpha!r}",
                    block_size=pool.block_size,
                )
                if shareable and pool.prefix_caching
                else []
            )
        return self._hashes

    @property
    def reuse_limit(self) -> int:
        """Prompt tokens the request may take from the prefix cache: all but the last (its logits are
        needed), none when it asks for prompt logprobs (every prompt position is then computed)."""
        return len(self.prompt.input_ids) - 1 if self.params.prompt_logprobs is None else 0

    def allocate_cache(self, pool: KVPool) -> BlockSequence:
        """Take the request's cache from the pool, with the longest cached prefix of its prompt."""
        self.cache = pool.sequence(self.block_hashes(pool), self.reuse_limit)
        return self.cache

    def release_cache(self) -> None:
        if self.cache is not None:
            self.cache.release()
            self.cache = None


def new_request(
    model: TextModel,
    tokenizer: Tokenizer,
    prompt: Prompt,
    params: SamplingParams,
    eos_ids,
    context: int,
    constraint: Constraint | None = None,
    pool: KVPool | None = None,
    speculation: Speculation | None = None,
) -> Request:
    """A request ready to run, its KV cache from ``pool``; without a pool its cache is left for
    ``Request.allocate_cache``. ``speculation``: draft and verify several tokens a step
    (engine/speculative.py)."""
    length = len(prompt.input_ids)
    if length == 0:
        raise RequestError("empty prompt")
    if length >= context:
        raise RequestError(f"prompt has {length} tokens, the context holds {context}")
    if constraint is not None and params.ignore_eos:
        raise RequestError("ignore_eos cannot be combined with a grammar (structured outputs or tools)")
    vocab = model.config.vocab_size
    if any(not 0 <= token < vocab for token, _ in params.logit_bias):
        raise RequestError(f"logit_bias: token ids must be in 0..{vocab - 1}")
    max_new = min(params.max_tokens, context - length)
    request = Request(
        prompt=prompt,
        params=params,
        eos_token_ids=frozenset(eos_ids),
        cache=None,
        sampler=Sampler(params),
        decoder=StreamDecoder(tokenizer, skip_special_tokens=True),
        stopper=StopMatcher(params.stop),
        max_new_tokens=max_new,
        constraint=constraint,
        prompt_logprobs=[None] if params.prompt_logprobs is not None else [],
        rope_alpha=model.rope_alpha(length),
        speculation=speculation,
    )
    if pool is not None:
        request.allocate_cache(pool)
    return request


class Generation:
    """Iterate for text pieces; ``result`` is set once the iteration ends.

    ``finish``: called with the result before it is set (the API adds the grounding fields there).
    ``pool``: where the request takes its KV cache when the iteration starts (if it has none yet); the
    blocks go back when the iteration ends, however it ends.
    """

    def __init__(
        self,
        model: TextModel,
        request: Request,
        finish: Callable[[GenerationResult], None] | None = None,
        pool: KVPool | None = None,
    ):
        self.model = model
        self.request = request
        self.finish = finish
        self.pool = pool
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        with torch.inference_mode():
            yield from self._run()

    def _run(self) -> Iterator[str]:
        if self.request.cache is None and self.pool is not None:
            self.request.allocate_cache(self.pool)
        try:
            yield from self._generate()
        finally:
            self.request.release_cache()

    def _generate(self) -> Iterator[str]:
        req, model = self.request, self.model
        started = time.perf_counter()
        cached = req.cache.cached_tokens if req.cache is not None else 0
        length = len(req.prompt.input_ids) - cached  # the tokens this prefill reads
        if length >= status.LONG_PROMPT_TOKENS:
            with status.step(f"prefill of {length} prompt tokens"):
                logits = prefill(model, req)
        else:
            logits = prefill(model, req)
        prefill_done = time.perf_counter()
        if req.speculation is not None:
            from . import speculative

            yield from speculative.decode(model, req, logits)
        else:
            yield from self._decode(logits)
        finished = time.perf_counter()
        result = GenerationResult(
            text=req.text,
            token_ids=list(req.output_ids),
            prompt_tokens=len(req.prompt.input_ids),
            finish_reason=req.finish_reason or "length",
            prefill_s=prefill_done - started,
            cached_tokens=cached,
            decode_s=finished - prefill_done,
            logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
            prompt_logprobs=list(req.prompt_logprobs) if req.params.prompt_logprobs is not None else None,
            draft_tokens=req.draft_tokens,
            accepted_tokens=req.accepted_tokens,
        )
        if self.finish is not None:
            self.finish(result)
        self.result = result

    def _decode(self, logits: torch.Tensor) -> Iterator[str]:
        """Plain decoding: one token a step, from the prefill's logits until the request finishes."""
        req, model = self.request, self.model
        history = torch.tensor(req.prompt.input_ids, dtype=torch.long)
        prompt_length = len(req.prompt.input_ids)
        while True:
            token = sample_next(req, logits, history, history[prompt_length:])
            req.output_ids.append(token)
            piece = accept_token(req, token)
            if piece:
                yield piece
            if req.finish_reason:
                break
            history = torch.cat([history, torch.tensor([token])])
            logits = decode_step(model, req, token)


def sample_next(req: Request, logits: torch.Tensor, history: torch.Tensor, generated: torch.Tensor) -> int:
    """The request's next token from its logits [vocab]: the grammar's mask (if any) and the sampler.
    Records the token's log-probabilities (of the raw logits) when the request asks for them."""
    logprobs = torch.log_softmax(logits, dim=-1) if req.params.logprobs is not None else None
    if req.constraint is not None:
        allowed = req.constraint.allowed()
        if allowed is not None:
            logits = apply_mask(logits, allowed)
    token = req.sampler(logits, history, generated)
    if req.constraint is not None:
        req.constraint.accept(token)
    if logprobs is not None:
        req.logprobs.extend(token_logprobs(logprobs[None], torch.tensor([token]), req.params.logprobs))
    return token


def accept_token(req: Request, token: int) -> str:
    """Detokenize one new token (already in ``req.output_ids``); set finish_reason on EOS, a stop
    string or the token limit. Returns the new text (held-back text included once finished)."""
    if token in req.eos_token_ids and not req.params.ignore_eos:
        req.finish_reason = "stop"
        raw = req.decoder.flush()
        if req.params.logprobs is not None and req.logprobs:
            req.logprobs.pop()  # the end of sequence is not part of the answer
    else:
        raw = req.decoder.push(token)
        if len(req.output_ids) >= req.max_new_tokens:
            raw += req.decoder.flush()
            req.finish_reason = "length"
    piece, stopped = req.stopper.feed(raw)
    if stopped:
        req.finish_reason = "stop"
    elif req.finish_reason:
        piece += req.stopper.flush()
    req.text += piece
    return piece


def prefill(model: TextModel, req: Request) -> torch.Tensor:
    """Run the prompt through the model from its first uncached token (in chunks ending at multiples
    of PREFILL_CHUNK); the last token's logits."""
    assert req.cache is not None
    length, start = len(req.prompt.input_ids), req.cache.cached_tokens
    logits = None
    while start < length:
        logits = prefill_chunk(model, req, start)
        start = chunk_end(start, length)
    assert logits is not None
    return logits


def chunk_end(start: int, length: int) -> int:
    """Where the prefill chunk at ``start`` ends: the next multiple of PREFILL_CHUNK (so a prompt is
    cut at the same places whatever prefix of it was cached), or the prompt's end."""
    return min((start // PREFILL_CHUNK + 1) * PREFILL_CHUNK, length)


def prefill_chunk(model: TextModel, req: Request, start: int) -> torch.Tensor | None:
    """Prefill the prompt tokens of the chunk at ``start`` (see ``chunk_end``); the logits after the
    prompt's last token, None before it. The chunk's full blocks are then offered to later requests."""
    embeds, positions, end = _chunk_inputs(model, req, start)
    hidden = model(embeds[None], positions[:, None], req.cache, start=start, rope_alpha=req.rope_alpha)
    assert req.cache is not None
    req.cache.register(end)
    if req.params.prompt_logprobs is not None:
        _record_prompt_logprobs(model, req, hidden[0], start)
    return model.logits(hidden[0, -1]) if end == len(req.prompt.input_ids) else None


def prefill_chunks(model: TextModel, chunks: Sequence[tuple[Request, int]]) -> list[torch.Tensor | None]:
    """``prefill_chunk`` for several requests in one forward (their tokens packed into one sequence,
    each chunk attending to its own cache): the weights are read once for all. Per chunk, the logits
    after its prompt's last token, or None before it."""
    if len(chunks) == 1:
        return [prefill_chunk(model, *chunks[0])]
    inputs = [_chunk_inputs(model, req, start) for req, start in chunks]
    lengths = [embeds.shape[0] for embeds, _, _ in inputs]
    hidden = model.forward_segments(
        torch.cat([embeds for embeds, _, _ in inputs])[None],
        torch.cat([positions for _, positions, _ in inputs], dim=1)[:, None],
        [req.cache for req, _ in chunks],
        [start for _, start in chunks],
        lengths,
        [req.rope_alpha for req, _ in chunks],
    )
    for (req, _), (_, _, end) in zip(chunks, inputs):
        req.cache.register(end)
    ends = torch.tensor(lengths).cumsum(0) - 1
    for (req, start), end, length in zip(chunks, ends.tolist(), lengths):
        if req.params.prompt_logprobs is not None:
            _record_prompt_logprobs(model, req, hidden[0, end + 1 - length : end + 1], start)
    finished = [i for i, (req, _) in enumerate(chunks) if inputs[i][2] == len(req.prompt.input_ids)]
    logits = model.logits(hidden[0, ends[finished]]) if finished else None
    out: list[torch.Tensor | None] = [None] * len(chunks)
    for row, i in enumerate(finished):
        out[i] = logits[row]
    return out


PROMPT_LOGPROB_ROWS = 64  # logits rows at a time for prompt logprobs (64 × 152k floats = 39 MB)


def _record_prompt_logprobs(model: TextModel, req: Request, hidden: torch.Tensor, start: int) -> None:
    """Log-probabilities of the prompt tokens that the chunk's positions predict (hidden [L, H] of the
    positions start … start + L): position p predicts token p + 1; the last prompt position predicts
    the first generated token, which the sampling step records."""
    ids = req.prompt.input_ids
    del req.prompt_logprobs[start + 1 :]  # a chunk run again (after a failed batch) records it once
    count = min(hidden.shape[0], len(ids) - 1 - start)
    for row in range(0, max(count, 0), PROMPT_LOGPROB_ROWS):
        rows = min(PROMPT_LOGPROB_ROWS, count - row)
        logprobs = torch.log_softmax(model.logits(hidden[row : row + rows]), dim=-1)
        targets = torch.tensor(ids[start + row + 1 : start + row + 1 + rows], dtype=torch.long)
        req.prompt_logprobs.extend(token_logprobs(logprobs, targets, req.params.prompt_logprobs))


def _chunk_inputs(model: TextModel, req: Request, start: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Embeddings [L, H] (vision rows in place) and position ids [3, L] of the prompt chunk at start, and its end."""
    prompt = req.prompt
    end = chunk_end(start, len(prompt.input_ids))
    ids = torch.tensor(prompt.input_ids[start:end], dtype=torch.long)
    embeds = model.embed(ids)
    if prompt.visual_embeds is not None:
        visual = torch.tensor(prompt.visual_token_ids)
        slots = torch.isin(ids, visual)
        if slots.any():
            before = int(torch.isin(torch.tensor(prompt.input_ids[:start], dtype=torch.long), visual).sum())
            rows = prompt.visual_embeds[before : before + int(slots.sum())]
            embeds[slots] = rows.to(embeds.dtype)
    return embeds, prompt.position_ids[:, start:end], end


def decode_step(model: TextModel, req: Request, token: int) -> torch.Tensor:
    start = len(req.prompt.input_ids) + len(req.output_ids) - 1
    embeds = model.embed(torch.tensor([[token]], dtype=torch.long))
    positions = torch.full((3, 1, 1), req.next_position, dtype=torch.long)
    hidden = model(embeds, positions, req.cache, start=start, rope_alpha=req.rope_alpha)
    return model.logits(hidden[0, -1])
