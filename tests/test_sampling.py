"""Sampling filters against transformers' logits processors; parameters; stop strings."""

from __future__ import annotations

import pytest
import torch

from qwenvl.config import GenerationConfig
from qwenvl.engine.generate import StopMatcher
from qwenvl.engine.sampler import (
    Sampler,
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    min_p_filter,
    sampling_params,
    top_k_filter,
    top_p_filter,
)
from qwenvl.errors import RequestError


@pytest.fixture
def logits():
    return torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3


def _same_support(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs[0]))
    finite = ~torch.isinf(ours)
    assert torch.allclose(ours[finite], theirs[0][finite])


@pytest.mark.parametrize("k", [1, 5, 50, 2000])
def test_top_k_matches_transformers(logits, k):
    from transformers.generation.logits_process import TopKLogitsWarper

    _same_support(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits[None].clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.8, 0.99])
def test_top_p_matches_transformers(logits, p):
    from transformers.generation.logits_process import TopPLogitsWarper

    _same_support(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits[None].clone()))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
def test_min_p_matches_transformers(logits, p):
    from transformers.generation.logits_process import MinPLogitsWarper

    _same_support(min_p_filter(logits, p), MinPLogitsWarper(p)(None, logits[None].clone()))


def test_repetition_penalty_matches_transformers(logits):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    history = torch.tensor([3, 7, 7, 999, 0])
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(history[None], logits[None].clone())
    assert torch.allclose(apply_repetition_penalty(logits, history, 1.3), theirs[0])


def test_seed_reproducible_and_greedy(logits):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42)
    draws = [[Sampler(params)(logits, torch.tensor([], dtype=torch.long)) for _ in range(1)] for _ in range(2)]
    assert draws[0] == draws[1]
    sampler = Sampler(SamplingParams(temperature=0.9, seed=7))
    sequence_a = [sampler(logits, torch.tensor([], dtype=torch.long)) for _ in range(20)]
    sampler = Sampler(SamplingParams(temperature=0.9, seed=7))
    assert sequence_a == [sampler(logits, torch.tensor([], dtype=torch.long)) for _ in range(20)]
    assert len(set(sequence_a)) > 1
    assert Sampler(SamplingParams(temperature=0))(logits, torch.tensor([], dtype=torch.long)) == int(logits.argmax())


@pytest.mark.parametrize("temperature", [4.66e-220, 1e-9, 9.9e-6])
def test_tiny_temperatures_are_greedy(logits, temperature):
    """1/T would overflow the logits to inf (NaN probabilities): below 1e-5 sampling is greedy."""
    sampler = Sampler(SamplingParams(temperature=temperature, seed=1))
    assert sampler(logits, torch.tensor([], dtype=torch.long)) == int(logits.argmax())


def test_defaults_come_from_generation_config():
    config = GenerationConfig(
        eos_token_ids=(1,), do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05
    )
    params = sampling_params(config, max_tokens=10)
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (0.7, 20, 0.8, 1.05)
    assert sampling_params(config, temperature=0).greedy
    assert sampling_params(GenerationConfig()).greedy  # do_sample False → greedy, as transformers


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_tokens=0),
        dict(max_tokens=-3),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(min_p=2),
        dict(repetition_penalty=0),
        dict(stop=[""]),
        dict(presence_penalty=2.01),
        dict(presence_penalty=-3),
        dict(frequency_penalty=2.5),
        dict(frequency_penalty=-2.1),
        dict(max_tokens="8"),
        dict(temperature=float("nan")),
        dict(top_k=1.5),
        dict(seed="x"),
    ],
)
def test_invalid_sampling_values_are_request_errors(bad):
    with pytest.raises(RequestError, match=next(iter(bad))):
        sampling_params(GenerationConfig(), **bad)


def test_presence_and_frequency_penalties_by_hand():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    generated = torch.tensor([1, 3, 3, 3, 4, 1])
    # token 1 twice, 3 three times, 4 once: logits[t] -= presence * (count > 0) + frequency * count
    expected = torch.tensor([1.0, 2.0 - 0.5 - 2 * 0.25, 3.0, 4.0 - 0.5 - 3 * 0.25, 5.0 - 0.5 - 0.25])
    assert torch.allclose(apply_presence_frequency_penalty(logits, generated, 0.5, 0.25), expected)
    assert torch.equal(logits, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))  # not modified in place
    negative = apply_presence_frequency_penalty(logits, generated, -1.0, 0.0)
    assert torch.allclose(negative, torch.tensor([1.0, 3.0, 3.0, 5.0, 6.0]))


def test_penalties_count_generated_tokens_only():
    logits = torch.tensor([0.0, 3.0, 2.9, 0.0])
    prompt_and_output = torch.tensor([1, 1, 1, 2])  # the prompt repeats 1; the output is [2]
    sampler = Sampler(SamplingParams(temperature=0, presence_penalty=0.5))
    assert sampler(logits, prompt_and_output, prompt_and_output[3:]) == 1  # 2 penalised: 2.4 < 3.0
    assert sampler(logits, prompt_and_output, prompt_and_output[:0]) == 1
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=0.2))
    assert sampler(logits, prompt_and_output, prompt_and_output[1:]) == 2  # 1 twice: 3.0 - 0.4 < 2.9
    assert sampler(logits, prompt_and_output) == 1  # no generated ids given: no penalty


def test_unknown_option_rejected():
    with pytest.raises(RequestError, match="unknown sampling option"):
        sampling_params(GenerationConfig(), temprature=0.5)


def test_stop_matcher_holds_back_partial_matches():
    matcher = StopMatcher(("STOP", "\n\n"))
    out = []
    for piece in ["Hello S", "TO", "P more"]:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello " and stopped
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("a ST") == ("a ", False)
    assert matcher.feed("ar") == ("STar", False)
    assert matcher.flush() == ""
    matcher = StopMatcher(("xyz",))
    assert matcher.feed("ends with xy") == ("ends with ", False)
    assert matcher.flush() == "xy"
