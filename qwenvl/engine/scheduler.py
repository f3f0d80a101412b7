"""Continuous batching: many requests decoded together, the weights read once per step for all.

One loop thread owns the model. Each iteration it
1. retires cancelled requests (their KV caches are freed at once),
2. admits waiting requests while fewer than ``max_batch`` are active (each gets its own KV cache)
   and prefills their prompt chunks, up to PREFILL_CHUNK tokens per iteration, all in one forward
   (``TextModel.forward_segments``), so running requests keep streaming while a long prompt is read,
3. runs one decode step for every running request (``TextModel.decode``: one matmul per weight for
   all rows, attention per row on the row's own cache and position), then samples each row with the
   request's own sampler and streams the new text to the request's handle. With speculative
   decoding (engine/speculative.py) a request adds its draft as more rows of that step (the step's
   rows stay within ``speculative.MAX_ROWS``) and may take several tokens from it.
A request never waits for another to finish, only for a free slot. A request whose step raises ends
with finish_reason "error"; the others go on. docs/engine.md has the details.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BusyError, QwenVLError, RequestError
from . import speculative
from .generate import (
    PREFILL_CHUNK,
    GenerationResult,
    Request,
    TokenLogprob,
    accept_token,
    chunk_end,
    new_request,
    prefill_chunk,
    prefill_chunks,
    sample_next,
)
from .grammar import Constraint
from .kv_cache import KVCacheFull
from .prompt import Prompt
from .sampler import sampling_params
from .speculative import Speculation

if TYPE_CHECKING:
    from ..api import Model


@dataclass
class TokenEvent:
    text: str  # new detokenized text since the previous event (may be "")
    token_ids: list[int]  # new token ids since the previous event
    finish_reason: str | None  # None while running; then "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int  # total so far
    error: str | None = None  # one-line message when finish_reason == "error"
    busy: bool = False  # the error is the KV cache's budget, not a fault: worth retrying later
    logprobs: list[TokenLogprob] | None = None  # of token_ids (a final EOS excepted), when the request asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first event, when the request asked


class RequestHandle:
    """The caller's side of a submitted request: its events, its result, and cancel().

    Events are delivered once, to one consumer (``events`` or ``aevents``); ``result`` works whether
    or not they were consumed.
    """

    def __init__(self, request_id: str, prompt_tokens: int, wake_engine: Callable[[], None]):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._wake_engine = wake_engine
        self._queue: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self._notify: Callable[[], None] | None = None
        self._cancel_requested = threading.Event()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._dequeued = threading.Event()  # admitted to the batch, or ended, so no longer waiting
        self._dequeue_callbacks: list[Callable[[], None]] = []
        self._dequeue_lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop the request; its KV cache is freed before the engine's next step. Idempotent."""
        if not self._done.is_set() and not self._cancel_requested.is_set():
            self._cancel_requested.set()
            self._wake_engine()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Blocking iterator over the events; the last one has finish_reason set.

        ``timeout``: seconds to wait for each event; TimeoutError when exceeded.
        """
        while True:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id}: no event within {timeout} s") from None
            yield event
            if event.finish_reason is not None:
                return

    async def aevents(self) -> AsyncIterator[TokenEvent]:
        """The events for asyncio code: waits without blocking the event loop (or using a thread)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._notify = lambda: loop.call_soon_threadsafe(ready.set)
        try:
            while True:
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    await ready.wait()
                    ready.clear()
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self._notify = None

    @property
    def waiting(self) -> bool:
        """True while the request is in the engine's queue (not yet admitted to the batch, not ended)."""
        return not self._dequeued.is_set()

    async def wait_dequeued(self, timeout: float | None = None) -> bool:
        """Wait (without blocking the event loop) until the engine admits the request to its batch or
        ends it; False if ``timeout`` seconds pass first (the request is then still waiting)."""
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(lambda: woken.done() or woken.set_result(None))
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                pass

        with self._dequeue_lock:
            if self._dequeued.is_set():
                return True
            self._dequeue_callbacks.append(wake)
        try:
            await asyncio.wait_for(woken, timeout)
        except TimeoutError:
            return False
        finally:
            with self._dequeue_lock:
                if wake in self._dequeue_callbacks:
                    self._dequeue_callbacks.remove(wake)
        return True

    def result(self) -> GenerationResult:
        """Block until the request ends; its text, token ids, finish reason (and error) and timings."""
        self._done.wait()
        assert self._result is not None
        return self._result

    # -- the engine's side ----------------------------------------------------------------------
    def _emit(self, event: TokenEvent) -> None:
        self._queue.put(event)
        notify = self._notify
        if notify is not None:
            try:
                notify()
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                pass

    def _finish(self, result: GenerationResult) -> None:
        self._result = result
        self._done.set()
        self._leave_queue()

    def _leave_queue(self) -> None:
        with self._dequeue_lock:
            self._dequeued.set()
            callbacks, self._dequeue_callbacks = self._dequeue_callbacks, []
        for callback in callbacks:
            callback()


class _Sequence:
    """A request inside the engine: the shared Request plus the engine's bookkeeping."""

    def __init__(self, handle: RequestHandle, request: Request):
        self.handle = handle
        self.request = request
        prompt_length = len(request.prompt.input_ids)
        self.prompt_length = prompt_length
        # prompt + generated ids, filled as tokens come (the samplers' history without a copy per step)
        self.history = torch.empty(prompt_length + request.max_new_tokens, dtype=torch.long)
        self.history[:prompt_length] = torch.tensor(request.prompt.input_ids, dtype=torch.long)
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.cached_tokens = 0  # of which found in the prefix cache at admission
        self.draft: list[int] = []  # speculation: the tokens drafted for the coming decode step
        self.submitted = time.perf_counter()
        self.admitted = 0.0
        self.first_token = 0.0
        self.followers: list[_Sequence] = []  # the other choices of its prompt, forked once it is prefilled

    @property
    def cancelled(self) -> bool:
        return self.handle._cancel_requested.is_set()


class BatchEngine:
    """Runs submitted requests concurrently on one model; see the module docstring."""

    def __init__(
        self, model: Model, *, max_batch: int = 8, max_waiting: int = 1024, speculation: Speculation | None = None
    ):
        """``speculation``: every request drafts and verifies several tokens a step (same outputs)."""
        if max_batch < 1:
            raise QwenVLError(f"max_batch must be at least 1, got {max_batch}")
        if max_waiting < 0:
            raise QwenVLError(f"max_waiting must be >= 0, got {max_waiting}")
        self.model = model
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.speculation = speculation
        self._draft_tokens = 0  # speculation: drafted, and kept, over every finished step
        self._accepted_tokens = 0
        self._decode_tokens = 0  # tokens emitted by decode steps, and the seconds those steps took
        self._decode_seconds = 0.0
        self._eos = model.generation_config.eos_token_ids or tuple(
            i for i in (model.tokenizer.eos_token_id,) if i is not None
        )
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []  # admitted, prompt not fully in the cache yet
        self._running: list[_Sequence] = []  # decoding
        self._steps = 0
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- the public side ----------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine has been shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="qwenvl-batch-engine", daemon=True)
                self._thread.start()

    def shutdown(self) -> None:
        """Stop the loop, cancel every request (their last event says "cancelled"), join the thread."""
        with self._work:
            self._stopping = True
            self._work.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._cancel_everything()

    def submit(
        self, prompt: Prompt | list[int], constraint: Constraint | None = None, **sampling: Any
    ) -> RequestHandle:
        """Queue a request; RequestError here, synchronously, for anything wrong with it (BusyError: the
        queue already holds ``max_waiting`` requests). ``constraint``: the grammar its output must follow
        (``GrammarCompiler.constraint``), owned by the request."""
        return self.submit_choices(prompt, 1, [constraint], **sampling)[0]

    def submit_choices(
        self,
        prompt: Prompt | list[int],
        n: int,
        constraints: list[Constraint | None] | None = None,
        **sampling: Any,
    ) -> list[RequestHandle]:
        """Queue ``n`` choices of one prompt (OpenAI's ``n``): the prompt is prefilled once, then each
        choice continues on a fork of its KV cache (the blocks are shared, a block is copied when a
        choice first writes it) with a sampler of its own (seeded ``seed + i`` when a seed is given).
        ``constraints``: each choice's own grammar state (or None). One handle per choice."""
        if n < 1:
            raise RequestError(f"n must be at least 1, got {n}")
        if not isinstance(prompt, Prompt):
            prompt = Prompt.text_only(list(prompt))
        params = sampling_params(self.model.generation_config, **sampling)
        context = self.model.context
        length = len(prompt.input_ids)
        if sampling.get("max_tokens") is not None and 0 < length < context and length + params.max_tokens > context:
            raise RequestError(
                f"prompt ({length} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {context} tokens"
            )
        pool = self.model.kv_pool
        if length + 1 > pool.num_blocks * pool.block_size:
            raise RequestError(
                f"prompt ({length} tokens) does not fit the KV cache ({pool.num_blocks * pool.block_size} tokens, "
                f"{pool.nbytes / 2**20:.0f} MiB); raise --kv-cache-mb"
            )
        constraints = constraints or [None] * n
        requests = []
        for index, constraint in enumerate(constraints):
            choice = sampling_params(
                self.model.generation_config, **{**sampling, "seed": params.seed + index}
            ) if params.seed is not None else params  # fmt: skip
            requests.append(
                new_request(
                    self.model.text_model,
                    self.model.tokenizer,
                    prompt,
                    choice,
                    self._eos,
                    context,
                    constraint=constraint,
                    speculation=self.speculation,
                )
            )
        self.start()
        with self._work:
            if self._stopping:
                raise RuntimeError("the engine has been shut down")
            if len(self._waiting) >= self.max_waiting:
                raise BusyError(f"the queue is full ({self.max_waiting} requests waiting); try again later")
            seqs = [_Sequence(RequestHandle(f"req-{next(self._ids)}", length, self._wake), r) for r in requests]
            seqs[0].followers = seqs[1:]
            self._waiting.append(seqs[0])
            self._work.notify_all()
        return [seq.handle for seq in seqs]

    def _kv_bytes(self) -> int:
        """Bytes of the KV blocks the admitted requests hold, a shared block once (caller holds the lock)."""
        caches = [seq.request.cache for seq in self._prefilling + self._running]
        blocks = {block for cache in caches if cache is not None for block in cache.blocks}
        return len(blocks) * self.model.kv_pool.block_bytes

    def stats(self) -> dict:
        with self._lock:
            return {
                "running": len(self._running) + len(self._prefilling),
                "waiting": len(self._waiting),
                "kv_cache_bytes": self._kv_bytes(),
                "steps": self._steps,
                "draft_tokens": self._draft_tokens,
                "accepted_tokens": self._accepted_tokens,
                "decode_tokens": self._decode_tokens,
                "decode_seconds": self._decode_seconds,
            }

    # -- the loop -------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._work:
            self._work.notify_all()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._work:
                    while not self._stopping and not self._has_work():
                        self._work.wait()
                    if self._stopping:
                        return
                try:
                    self._iteration()
                except Exception as exc:  # a fault of the loop itself: end what it held, keep serving
                    for seq in self._prefilling + self._running:
                        self._end(seq, "error", exc)

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill()
        if self._running:
            self._decode()

    def _drop_cancelled(self) -> None:
        with self._lock:
            waiting = [seq for seq in self._waiting if seq.cancelled]
            for seq in waiting:
                self._waiting.remove(seq)
        for seq in waiting + [s for s in self._prefilling + self._running if s.cancelled]:
            self._end(seq, "cancelled")

    def _admit(self) -> None:
        while True:
            with self._lock:
                active = len(self._prefilling) + len(self._running)
                if not self._waiting or (active and active + 1 + len(self._waiting[0].followers) > self.max_batch):
                    return
                if active:  # wait for blocks the running requests will free
                    pool = self.model.kv_pool
                    need = -(-self._waiting[0].prompt_length // pool.block_size) + 1
                    if pool.available() < need or self._prefix_in_flight(self._waiting[0]):
                        return
                seq = self._waiting.popleft()
                self._prefilling.append(seq)
            seq.handle._leave_queue()
            for follower in seq.followers:
                follower.handle._leave_queue()
            try:
                cache = seq.request.allocate_cache(self.model.kv_pool)
            except Exception as exc:  # e.g. out of memory: this request only
                self._end(seq, "error", exc)
                continue
            seq.prefilled = seq.cached_tokens = cache.cached_tokens
            seq.admitted = time.perf_counter()

    def _prefix_in_flight(self, seq: _Sequence) -> bool:
        """True when the next block of the request's prompt that the cache lacks is one a request now
        in prefill is computing (the same hash, not yet registered): admitted once that prefill has
        registered it, the request reuses the block instead of computing it again — so requests that
        arrive together with a shared system prompt prefill it once (caller holds the lock)."""
        request, pool = seq.request, self.model.kv_pool
        hashes = request.block_hashes(pool)[: request.reuse_limit // pool.block_size]
        cached = pool.cached_prefix(hashes)
        if cached == len(hashes):
            return False
        pending = hashes[cached]
        for other in self._prefilling:
            cache = other.request.cache
            if cache is not None and pending in cache.hashes[cache.registered :]:
                return True
        return False

    def _prefill(self) -> None:
        """Prefill the admitted requests' next chunks (cut as generate.prefill cuts them), up to
        PREFILL_CHUNK tokens in all, in one forward for all of them."""
        chunks, budget = [], PREFILL_CHUNK
        for seq in self._prefilling:
            if budget <= 0:
                break
            chunks.append(seq)
            budget -= chunk_end(seq.prefilled, seq.prompt_length) - seq.prefilled
        if not chunks:
            return
        model = self.model.text_model
        results = self._together_or_alone(
            chunks,
            lambda seqs: prefill_chunks(model, [(seq.request, seq.prefilled) for seq in seqs]),
            lambda seq: prefill_chunk(model, seq.request, seq.prefilled),
        )
        for seq, logits in zip(chunks, results):
            if seq.handle.done:
                continue
            seq.prefilled = chunk_end(seq.prefilled, seq.prompt_length)
            if logits is not None:
                with self._lock:
                    self._prefilling.remove(seq)
                    self._running.append(seq)
                seq.first_token = time.perf_counter()
                self._fork_followers(seq, logits)
                self._take_token(seq, logits)

    def _fork_followers(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """The prompt is in: each other choice of it takes a fork of its cache and its first token."""
        followers, seq.followers = seq.followers, []
        for follower in followers:
            if follower.cancelled:
                self._end(follower, "cancelled")
                continue
            assert seq.request.cache is not None
            follower.request.cache = seq.request.cache.fork()
            follower.prefilled, follower.cached_tokens = seq.prefilled, seq.cached_tokens
            follower.admitted, follower.first_token = seq.admitted, seq.first_token
            with self._lock:
                self._running.append(follower)
            self._take_token(follower, logits)

    def _decode(self) -> None:
        started = time.perf_counter()
        rows = list(self._running)
        before = sum(len(seq.request.output_ids) for seq in rows)
        if self._plan_drafts(rows):
            model = self.model.text_model
            logits = self._together_or_alone(
                rows,
                lambda seqs: speculative.forward_rows(model, [s.request for s in seqs], [s.draft for s in seqs]),
                lambda seq: speculative.forward_rows(model, [seq.request], [seq.draft])[0],
            )
        else:
            logits = self._together_or_alone(rows, self._decode_rows, lambda seq: self._decode_rows([seq])[0])
        for seq, row in zip(rows, logits):
            if not seq.handle.done:
                self._take_token(seq, row)
        with self._lock:
            self._steps += 1
            self._decode_tokens += sum(len(seq.request.output_ids) for seq in rows) - before
            self._decode_seconds += time.perf_counter() - started

    def _plan_drafts(self, rows: list[_Sequence]) -> bool:
        """Each speculating request's draft for this step, the step's rows kept within
        ``speculative.MAX_ROWS`` and the KV blocks the pool has free (requests first come, first served);
        whether any request drafted."""
        budget = speculative.MAX_ROWS - len(rows)
        spare = self.model.kv_pool.available() - sum(speculative.new_blocks(seq.request, 1) for seq in rows)
        for seq in rows:
            count = seq.prompt_length + len(seq.request.output_ids)
            seq.draft = speculative.draft(seq.request, seq.history[:count], budget, spare) if budget > 0 else []
            budget -= len(seq.draft)
            spare -= speculative.new_blocks(seq.request, 1 + len(seq.draft)) - speculative.new_blocks(seq.request, 1)
        return any(seq.draft for seq in rows)

    def _together_or_alone(
        self, seqs: list[_Sequence], together: Callable[[list[_Sequence]], Any], alone: Callable[[_Sequence], Any]
    ) -> Any:
        """``together(seqs)``; if it raises, ``alone(seq)`` for each to find which request(s) it fails
        for (rewriting the same cache slots): those end with an error and get None, the others go on."""
        try:
            return together(seqs)
        except Exception:
            results = []
            for seq in seqs:
                try:
                    results.append(alone(seq))
                except Exception as exc:
                    self._end(seq, "error", exc)
                    results.append(None)
            return results

    def _decode_rows(self, rows: list[_Sequence]) -> torch.Tensor:
        """Logits [B, vocab] of one decode step for these running requests."""
        model = self.model.text_model
        requests = [seq.request for seq in rows]
        tokens = torch.tensor([[r.output_ids[-1]] for r in requests], dtype=torch.long)
        positions = torch.tensor([r.next_position for r in requests], dtype=torch.long)
        positions = positions.view(1, -1, 1).expand(3, -1, -1)
        hidden = model.decode(
            model.embed(tokens),
            positions,
            [r.cache for r in requests],
            [r.next_start for r in requests],
            [r.rope_alpha for r in requests],
        )
        return model.logits(hidden[:, -1])

    def _take_token(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Sample the request's next token from its logits (with a draft: its tokens from its rows of
        logits), stream it, retire the request if done."""
        try:
            req = seq.request
            count = seq.prompt_length + len(req.output_ids)
            recorded = len(req.logprobs)
            if logits.dim() == 2:  # the rows of a speculative step
                drafted, accepted = req.draft_tokens, req.accepted_tokens
                tokens, piece = speculative.take(req, logits, seq.draft, seq.history)
                with self._lock:
                    self._draft_tokens += req.draft_tokens - drafted
                    self._accepted_tokens += req.accepted_tokens - accepted
            else:
                token = sample_next(req, logits, seq.history[:count], seq.history[seq.prompt_length : count])
                req.output_ids.append(token)
                seq.history[count] = token
                tokens, piece = [token], accept_token(req, token)
        except Exception as exc:
            self._end(seq, "error", exc)
            return
        event = TokenEvent(piece, tokens, req.finish_reason, seq.prompt_length, len(req.output_ids))
        if req.params.logprobs is not None:
            event.logprobs = req.logprobs[recorded:]
        if req.params.prompt_logprobs is not None and len(req.output_ids) == 1:
            event.prompt_logprobs = list(req.prompt_logprobs)
        if req.finish_reason is None:
            seq.handle._emit(event)
        else:
            self._end(seq, req.finish_reason, last_event=event)

    def _end(
        self, seq: _Sequence, reason: str, exc: BaseException | None = None, last_event: TokenEvent | None = None
    ) -> None:
        """Retire a request: free its KV cache, send its last event, set its result."""
        req = seq.request
        with self._lock:
            for group in (self._prefilling, self._running):
                if seq in group:
                    group.remove(seq)
            req.release_cache()
        followers, seq.followers = seq.followers, []
        for follower in followers:  # ended before its prompt was in: so do the other choices
            self._end(follower, reason, exc)
        if seq.handle.done:
            return
        message = _one_line(exc) if exc is not None else None
        req.finish_reason = reason
        if last_event is None:
            last_event = TokenEvent("", [], reason, seq.prompt_length, len(req.output_ids), message)
            last_event.busy = isinstance(exc, KVCacheFull)
        now = time.perf_counter()
        first = seq.first_token or now
        seq.handle._emit(last_event)
        seq.handle._finish(
            GenerationResult(
                text=req.text,
                token_ids=list(req.output_ids),
                prompt_tokens=seq.prompt_length,
                finish_reason=reason,
                prefill_s=first - (seq.admitted or first),
                cached_tokens=seq.cached_tokens,
                decode_s=now - first,
                error=message,
                logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
                prompt_logprobs=list(req.prompt_logprobs) if req.params.prompt_logprobs is not None else None,
                draft_tokens=req.draft_tokens,
                accepted_tokens=req.accepted_tokens,
            )
        )

    def _cancel_everything(self) -> None:
        with self._lock:
            pending = list(self._waiting) + self._prefilling + self._running
            self._waiting.clear()
        for seq in pending:
            self._end(seq, "cancelled")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    if isinstance(exc, QwenVLError):
        return detail or type(exc).__name__
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
