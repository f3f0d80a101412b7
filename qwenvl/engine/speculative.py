"""Prompt-lookup (n-gram) speculative decoding: drafts copied from the context, verified in one forward.

No second model. After each step the proposer looks for the last few tokens (an n-gram, the longest of
``NGRAM_MAX`` … ``NGRAM_MIN`` that occurs) earlier in the prompt + output, and drafts the up to k tokens
that followed its latest occurrence. A single common token is no evidence (``NGRAM_MIN`` is 2), and
each request adapts how much it drafts to what its drafts earned (``Drafting``: the draft grows while
drafts are kept whole, shrinks when they are cut, and drafting pauses for longer and longer after
drafts of which nothing was kept), so an answer with nothing to copy runs almost only plain steps. One forward then runs the last sampled token and the draft as
k + 1 rows of the same sequence (``TextModel.decode``: the rows share the request's KV cache at
consecutive positions; the projections read the weights once for all rows), so a row's logits are the
ones a plain decode step would compute there, bit for bit (the linear kernels compute each row alone
up to ``MAX_ROWS`` rows; the attention kernel stores every row's key/value before any row attends).

Acceptance, row by row, with the request's own sampling transforms (bias, penalties, temperature,
top-k/p, min-p, grammar mask) applied to the row's logits as they would be to a plain step's:

- greedy: the draft token is kept while it is the argmax; the first mismatch is replaced by the argmax;
- sampled: the draft token x is kept with probability p(x); on rejection the token is drawn from p with
  x removed, renormalized (the standard speculative rule for a deterministic draft, which leaves the
  output distribution exactly p);
- after a fully kept draft the last row gives one more token (drawn from p as a plain step would).

So every step emits 1 … k + 1 tokens; the KV cache is rolled back past the rejected rows
(``BlockSequence.truncate``, which never modifies a shared block; draft rows lie past the prompt, so
they are never registered in the prefix cache). A draft takes only KV blocks the pool can spare
(``room``). Grammar, penalties and logprobs see each emitted token in order, exactly as in plain
decoding: nothing about a request has to be refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import RequestError
from ..models.text import TextModel
from ..quant.linear import GEMV_MAX_ROWS
from .generate import Request, accept_token, token_logprobs
from .grammar import apply_mask

METHODS = ("ngram",)
DEFAULT_TOKENS = 5
MAX_ROWS = GEMV_MAX_ROWS  # rows of one decode step: up to here the linear kernels compute each row alone
MAX_TOKENS = MAX_ROWS - 1
NGRAM_MAX = 3  # the longest context suffix looked up
NGRAM_MIN = 2  # the shortest: a 1-token match (a comma, "the") predicts too little to pay for its rows
MAX_PAUSE = 16  # plain steps at most between two drafts after drafts of which nothing was kept


@dataclass(frozen=True)
class Speculation:
    """How a request drafts: the method (``"ngram"``: prompt lookup) and up to how many tokens a step."""

    method: str = "ngram"
    tokens: int = DEFAULT_TOKENS


@dataclass
class Drafting:
    """One request's drafting state (on the request, ``Request.drafting``), adapted after every
    verified draft: ``limit`` (tokens the next draft may have, 1 … the request's K) grows by 2 after a
    draft kept whole and shrinks by 1 after one cut short, and halves after a draft of which nothing
    was kept; ``misses`` such drafts in a row pause drafting for 2^(misses−1) − 1 plain steps (at most
    ``MAX_PAUSE``). A kept token ends the pause streak."""

    cap: int
    limit: int
    pause: int = 0  # plain steps left before the next draft
    misses: int = 0  # drafts in a row of which nothing was kept

    @classmethod
    def start(cls, tokens: int) -> Drafting:
        return cls(cap=tokens, limit=tokens)

    def wait(self) -> bool:
        """True (and one step of the pause spent) while drafting is paused."""
        if self.pause > 0:
            self.pause -= 1
            return True
        return False

    def update(self, drafted: int, kept: int) -> None:
        """After a draft of ``drafted`` tokens of which the first ``kept`` were kept."""
        if drafted <= 0:
            return
        if kept == 0:
            self.misses += 1
            self.limit = max(1, self.limit // 2)
            self.pause = min(MAX_PAUSE, 2 ** (self.misses - 1) - 1)
            return
        self.misses = 0
        self.limit = min(self.cap, self.limit + 2) if kept == drafted else max(1, self.limit - 1)


def speculation(method: str | None, tokens: int | None = None) -> Speculation | None:
    """The ``speculative`` / ``spec_tokens`` options as given by the CLI, the API or the server; None
    when speculation is off. RequestError names a bad value."""
    if method is None or method == "none":
        if tokens is not None:
            raise RequestError("spec_tokens needs speculative='ngram'")
        return None
    if method not in METHODS:
        raise RequestError(f"speculative: unknown method {method!r} (supported: {', '.join(METHODS)})")
    if tokens is None:
        tokens = DEFAULT_TOKENS
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_TOKENS:
        raise RequestError(f"spec_tokens must be an integer in 1 … {MAX_TOKENS}, got {tokens!r}")
    return Speculation(method, tokens)


def propose(tokens: np.ndarray, count: int, ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN) -> list[int]:
    """Up to ``count`` tokens that followed the latest earlier occurrence of the longest suffix of
    ``tokens`` (n from ``ngram_max`` down to ``ngram_min``) that occurs earlier; [] when none does."""
    length = len(tokens)
    if count <= 0:
        return []
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)  # starts 0 … length - 1 - n
        hits = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + count].tolist()
    return []


def draft(req: Request, history: torch.Tensor, budget: int = MAX_TOKENS, spare_blocks: int | None = None) -> list[int]:
    """The request's draft for its next step (history: prompt + output so far), at most ``budget``
    tokens, never beyond its token limit nor past the KV blocks it may take (``room``), nor beyond
    what its ``Drafting`` state allows; [] without speculation or while drafting is paused."""
    spec = req.speculation
    if spec is None or req.finish_reason is not None:
        return []
    if req.drafting is None:
        req.drafting = Drafting.start(spec.tokens)
    if req.drafting.wait():
        return []
    count = min(req.drafting.limit, req.max_new_tokens - len(req.output_ids) - 1, budget, room(req, spare_blocks))
    return propose(history.numpy(), count)


def room(req: Request, spare_blocks: int | None = None) -> int:
    """Draft tokens the request's next step can hold beyond its plain row: those its blocks (with the
    plain row's) leave, plus ``spare_blocks`` more blocks (default: every block the pool has free)."""
    cache = req.cache
    if cache is None:
        return MAX_TOKENS
    size = cache.pool.block_size
    plain_end = req.next_start + 1
    held = max(len(cache.blocks), -(-plain_end // size))
    if spare_blocks is None:
        spare_blocks = cache.pool.available() - (held - len(cache.blocks))
    return max(0, (held + max(spare_blocks, 0)) * size - plain_end)


def new_blocks(req: Request, rows: int) -> int:
    """Blocks the pool must give the request for a step of ``rows`` rows."""
    cache = req.cache
    if cache is None:
        return 0
    return max(0, -(-(req.next_start + rows) // cache.pool.block_size) - len(cache.blocks))


def forward_rows(model: TextModel, requests: Sequence[Request], drafts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """One decode step for these requests, request i with 1 + len(drafts[i]) rows (its last sampled
    token, then its draft) at consecutive positions of its own cache. Per request, logits [rows, vocab]."""
    tokens: list[int] = []
    positions: list[int] = []
    starts: list[int] = []
    caches, alphas, sizes = [], [], []
    for req, guess in zip(requests, drafts):
        rows = 1 + len(guess)
        tokens += [req.output_ids[-1], *guess]
        positions += range(req.next_position, req.next_position + rows)
        starts += range(req.next_start, req.next_start + rows)
        caches += [req.cache] * rows
        alphas += [req.rope_alpha] * rows
        sizes.append(rows)
    ids = torch.tensor(tokens, dtype=torch.long)[:, None]
    position_ids = torch.tensor(positions, dtype=torch.long).view(1, -1, 1).expand(3, -1, -1)
    hidden = model.decode(model.embed(ids), position_ids, caches, starts, alphas)
    return list(model.logits(hidden[:, -1]).split(sizes))


def take(req: Request, logits: torch.Tensor, guess: Sequence[int], history: torch.Tensor) -> tuple[list[int], str]:
    """Emit the tokens of one verified step: rows of ``logits`` [1 + len(guess), vocab] judged in order
    (see the module docstring) until a draft token is rejected or the request finishes. ``history``:
    a buffer of prompt + output tokens with room for ``max_new_tokens``, extended here. Rolls the KV
    cache back past the rejected rows. Returns the tokens and their new text."""
    prompt_length = len(req.prompt.input_ids)
    tokens: list[int] = []
    text = ""
    kept = 0
    for row in range(logits.shape[0]):
        count = prompt_length + len(req.output_ids)
        drafted = guess[row] if row < len(guess) else None
        token = judge(req, logits[row], history[:count], history[prompt_length:count], drafted)
        req.output_ids.append(token)
        history[count] = token
        tokens.append(token)
        text += accept_token(req, token)
        if token == drafted:
            kept += 1
        if req.finish_reason is not None or token != drafted:
            break
    req.draft_tokens += len(guess)
    req.accepted_tokens += kept
    if guess and req.drafting is not None:
        req.drafting.update(len(guess), kept)
    if req.cache is not None and req.next_start < req.cache.length:  # rows past the kept tokens
        req.cache.truncate(req.next_start)
    return tokens, text


def judge(
    req: Request, logits: torch.Tensor, history: torch.Tensor, generated: torch.Tensor, drafted: int | None
) -> int:
    """The token at one row: ``sample_next``'s steps (grammar mask, sampler transforms, logprobs
    record, grammar advance) with the draft rule in place of the plain draw."""
    logprobs = torch.log_softmax(logits, dim=-1) if req.params.logprobs is not None else None
    if req.constraint is not None:
        allowed = req.constraint.allowed()
        if allowed is not None:
            logits = apply_mask(logits, allowed)
    choice = req.sampler.distribution(logits, history, generated)
    token = choice if isinstance(choice, int) else draw(choice, drafted, req.sampler.generator)
    if req.constraint is not None:
        req.constraint.accept(token)
    if logprobs is not None:
        req.logprobs.extend(token_logprobs(logprobs[None], torch.tensor([token]), req.params.logprobs))
    return token


def draw(probs: torch.Tensor, drafted: int | None, generator: torch.Generator) -> int:
    """A token from ``probs`` [vocab] given a deterministic draft: the draft with probability
    probs[drafted], else a draw from probs without it (renormalized). Without a draft: a plain draw."""
    if drafted is None:
        return int(torch.multinomial(probs, 1, generator=generator))
    kept = float(probs[drafted]) / float(probs.sum())
    if float(torch.rand((), generator=generator)) < kept:
        return drafted
    rest = probs.clone()
    rest[drafted] = 0.0
    if not float(rest.sum()) > 0:
        return drafted
    return int(torch.multinomial(rest, 1, generator=generator))


def decode(model: TextModel, req: Request, logits: torch.Tensor) -> Iterator[str]:
    """The decode loop of one request with speculation (``Generation``'s, for ``req.speculation``):
    from the prefill's logits, steps of draft + verify until the request finishes; text pieces."""
    prompt_length = len(req.prompt.input_ids)
    history = torch.empty(prompt_length + req.max_new_tokens, dtype=torch.long)
    history[:prompt_length] = torch.tensor(req.prompt.input_ids, dtype=torch.long)
    rows, guess = logits[None], []
    while True:
        _, piece = take(req, rows, guess, history)
        if piece:
            yield piece
        if req.finish_reason is not None:
            return
        guess = draft(req, history[: prompt_length + len(req.output_ids)])
        rows = forward_rows(model, [req], [guess])[0]
