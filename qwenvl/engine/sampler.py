"""Sampling parameters and the per-request sampler (transformers' logits-processor semantics)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..config import GenerationConfig
from ..errors import RequestError

GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated tokens
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # keep going past EOS (benchmarks), as vLLM's option
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, bias) added to the logits first
    logprobs: int | None = None  # log-probability of each generated token and of this many alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (all but the first)

    @property
    def greedy(self) -> bool:
        # below 1e-5, 1/T overflows the logits: such temperatures are greedy (as vLLM rounds them)
        return self.temperature < GREEDY_BELOW

    def validate(self) -> SamplingParams:
        _check_types(self)
        checks = [
            (self.max_tokens > 0, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(-100 <= bias <= 100 for _, bias in self.logit_bias), "logit_bias values must be in [-100, 100]"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)
        return self


_INTEGER_FIELDS = ("max_tokens", "top_k")
_OPTIONAL_INTEGER_FIELDS = ("seed", "logprobs", "prompt_logprobs")
_NUMBER_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _check_types(params: SamplingParams) -> None:
    for name in _INTEGER_FIELDS + _OPTIONAL_INTEGER_FIELDS + _NUMBER_FIELDS:
        value = getattr(params, name)
        if name in _OPTIONAL_INTEGER_FIELDS and value is None:
            continue
        integer = name in _INTEGER_FIELDS + _OPTIONAL_INTEGER_FIELDS
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
        if not integer and not math.isfinite(value):
            raise RequestError(f"{name} must be a finite number, got {value!r}")


def sampling_params(defaults: GenerationConfig, **overrides) -> SamplingParams:
    """Request values over the checkpoint's generation_config defaults (unset = None)."""
    base = {
        "temperature": defaults.temperature if defaults.do_sample else 0.0,
        "top_k": defaults.top_k,
        "top_p": defaults.top_p,
        "min_p": defaults.min_p,
        "repetition_penalty": defaults.repetition_penalty,
    }
    unknown = set(overrides) - set(SamplingParams.__dataclass_fields__)
    if unknown:
        raise RequestError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    values = base | {k: v for k, v in overrides.items() if v is not None}
    stop = values.get("stop", ())
    values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    values["logit_bias"] = _logit_bias(values.get("logit_bias", ()))
    return SamplingParams(**values).validate()


def _logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """{token id: bias} (keys may be digit strings, as JSON sends them) → sorted (id, bias) pairs."""
    pairs = bias.items() if isinstance(bias, dict) else bias
    try:
        out = {int(token): float(value) for token, value in pairs}
    except (TypeError, ValueError):
        raise RequestError("logit_bias: expected {token id: bias}") from None
    if any(not math.isfinite(value) for value in out.values()):
        raise RequestError("logit_bias values must be finite numbers")
    return tuple(sorted(out.items()))


class Sampler:
    """Turns logits into the next token; owns the request's random generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator().manual_seed(seed)
        self.bias_ids = torch.tensor([token for token, _ in params.logit_bias], dtype=torch.long)
        self.bias_values = torch.tensor([value for _, value in params.logit_bias], dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, history: torch.Tensor, generated: torch.Tensor | None = None) -> int:
        """logits [vocab] (float32); history: every token id so far (prompt + generated);
        generated: the generated ones alone (what presence / frequency penalties count).

        Extreme (finite) values never make it fail: scores pushed to +inf by a penalty or the temperature
        share the choice equally, NaN scores are never chosen, and torch.multinomial only ever sees
        finite, non-negative probabilities with a positive sum."""
        choice = self.distribution(logits, history, generated)
        if isinstance(choice, int):
            return choice
        return int(torch.multinomial(choice, 1, generator=self.generator))

    def distribution(
        self, logits: torch.Tensor, history: torch.Tensor, generated: torch.Tensor | None = None
    ) -> int | torch.Tensor:
        """What ``__call__`` draws from: the probabilities [vocab] after every transform (bias,
        penalties, temperature, top-k / top-p / min-p), or the token itself where the choice is
        deterministic (greedy, or nothing finite to sample from). Draws nothing."""
        p = self.params
        if p.logit_bias:
            logits = logits.index_add(0, self.bias_ids, self.bias_values.to(logits.dtype))
        raw = logits
        if p.repetition_penalty != 1.0 and history.numel():
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and generated is not None and generated.numel():
            logits = apply_presence_frequency_penalty(logits, generated, p.presence_penalty, p.frequency_penalty)
        if p.greedy:  # numpy's argmax (first maximum, as torch's) is ~25x faster over a 152k vocab here
            return _argmax(logits, raw)
        logits = finite_scores(logits.float() / p.temperature)
        if logits is None:  # every score is -inf or NaN: nothing to sample from
            return _argmax(raw, raw)
        if p.top_k:
            logits = top_k_filter(logits, p.top_k)
        if p.top_p < 1.0:
            logits = top_p_filter(logits, p.top_p)
        if p.min_p > 0.0:
            logits = min_p_filter(logits, p.min_p)
        probs = torch.softmax(logits, dim=-1)
        if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:  # cannot happen; never crash
            return _argmax(logits, raw)
        return probs


def finite_scores(logits: torch.Tensor) -> torch.Tensor | None:
    """Scores softmax can take: NaN → -inf (never chosen); if any score is +inf, those tokens get 0 and
    all others -inf (the limit of the distribution: an equal share among them). None if nothing is left."""
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    top = float(logits.max())
    if top == float("inf"):
        return torch.where(logits == top, 0.0, float("-inf")).to(logits.dtype)
    if top == float("-inf"):
        return None
    return logits


def _argmax(logits: torch.Tensor, fallback: torch.Tensor) -> int:
    """The first highest score, NaN never chosen; ``fallback``'s when every score is -inf or NaN."""
    scores = torch.nan_to_num(logits.float(), nan=float("-inf")).numpy()
    if not scores.max() > float("-inf") and fallback is not logits:
        scores = torch.nan_to_num(fallback.float(), nan=float("-inf")).numpy()
    return int(scores.argmax())


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: seen tokens' positive logits divided by the penalty, negative ones multiplied."""
    seen = logits.gather(0, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(0, history, seen)


def apply_presence_frequency_penalty(
    logits: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI / vLLM: logits[t] -= presence * (count[t] > 0) + frequency * count[t], counts over generated ids."""
    tokens, counts = torch.unique(generated, return_counts=True)
    penalty = presence + frequency * counts.to(logits.dtype)
    return logits.index_add(0, tokens, -penalty)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    threshold = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[-1] = False
    return logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's."""
    probs = logits.softmax(dim=-1)
    remove = probs < probs.max() * min_p
    return logits.masked_fill(remove, float("-inf"))
