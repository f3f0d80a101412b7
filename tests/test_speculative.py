"""Prompt-lookup speculative decoding: the same greedy tokens as plain decoding (alone, batched, with
images, grammar, stops, logprobs), the exact sampled distribution (chi-square), the flags and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import qwenvl
from qwenvl.cli import main as cli_main
from qwenvl.engine import speculative
from qwenvl.engine.generate import new_request, prefill
from qwenvl.engine.sampler import sampling_params, top_k_filter
from qwenvl.engine.scheduler import BatchEngine
from qwenvl.engine.speculative import Drafting, Speculation, propose
from qwenvl.errors import RequestError

TEXT_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, tie=False)
VL_SHAPE = dict(arch="qwen2_vl", hidden=64, heads=4, kv_heads=2, ffn=128, mrope_section=[2, 3, 3])
# a prompt with a block to copy: the random models fall into loops and repeat it, so drafts are kept
COPY = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\nRepeat the code above: def add(a, b):"


@pytest.fixture(scope="module")
def model(make_qwen2):
    return qwenvl.load(make_qwen2("untied-gqa2", **TEXT_SHAPE))


def chat(model, content, **options):
    return model.chat([{"role": "user", "content": content}], **options)


# -- the proposer --------------------------------------------------------------------------------


def test_propose_copies_what_followed_the_latest_longest_match():
    tokens = np.array([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    assert propose(tokens, 2) == [4, 5]  # the longest suffix "1 2 3" (at 0) wins over the later "2 3" (at 6)
    assert propose(tokens, 2, ngram_max=2) == [7, 8]  # "2 3": its latest occurrence
    assert propose(np.array([5, 1, 2, 6, 7, 1, 2]), 3) == [6, 7, 1]  # longest suffix "1 2" (n=2), its latest hit
    assert propose(np.array([4, 4, 4, 4]), 5) == [4]  # the continuation stops at the end of the context
    assert propose(np.array([1, 2, 3]), 4) == []  # nothing earlier matches
    assert propose(np.array([1, 2, 1]), 0) == []
    assert propose(np.array([7]), 3) == []


def test_a_single_token_match_drafts_nothing():
    """One common token (a comma, "the") is no evidence: the shortest n-gram looked up is 2 tokens."""
    tokens = np.array([5, 7, 9, 8, 5])
    assert propose(tokens, 3) == []
    assert propose(tokens, 3, ngram_min=1) == [7, 9, 8]


def test_drafting_grows_shrinks_and_pauses_after_misses():
    state = Drafting.start(8)
    state.limit = 3
    state.update(3, 3)  # kept whole: grows by 2
    assert (state.limit, state.pause) == (5, 0)
    state.update(5, 2)  # cut short: shrinks by 1
    assert (state.limit, state.pause, state.misses) == (4, 0, 0)
    pauses = []
    for _ in range(7):  # nothing kept, again and again: the limit halves, the pause doubles up to MAX_PAUSE
        state.update(state.limit, 0)
        pauses.append(pause := state.pause)
        assert [state.wait() for _ in range(pause)] == [True] * pause and not state.wait()
    assert state.limit == 1
    assert pauses == [0, 1, 3, 7, 15, speculative.MAX_PAUSE, speculative.MAX_PAUSE]
    state.update(1, 1)  # a kept token ends the streak
    assert (state.misses, state.pause, state.limit) == (0, 0, 3)
    state.update(0, 0)  # no draft: no change
    assert (state.misses, state.limit) == (0, 3)


def test_drafts_that_are_never_kept_are_soon_mostly_skipped(model, monkeypatch):
    """A proposer whose drafts are always wrong (the greedy token + 1): the greedy tokens are still
    plain decoding's, and after a few rejected drafts the request drafts rarely and little (before
    the adaptive state, every one of the 39 steps verified K extra rows)."""
    plain = chat(model, COPY, temperature=0, max_tokens=40, ignore_eos=True).token_ids
    vocab = model.text_model.config.vocab_size
    prompt_length = len(model.prepare([{"role": "user", "content": COPY}]).input_ids)

    def wrong(tokens, count, **_):
        done = len(tokens) - prompt_length  # the next token is plain[done]
        return [(plain[done] + 1) % vocab] * count if count else []

    monkeypatch.setattr(speculative, "propose", wrong)
    spec = chat(model, COPY, temperature=0, max_tokens=40, ignore_eos=True, speculative="ngram", spec_tokens=5)
    assert spec.token_ids == plain
    assert spec.accepted_tokens == 0
    # drafts of 5, 2, 1, then 1-token drafts after pauses of 1, 3, 7, 15 steps: 11 tokens in 39 steps
    assert 0 < spec.draft_tokens <= 12


# -- greedy: the same tokens as plain decoding ------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4, speculative.MAX_TOKENS])
def test_greedy_equals_plain(model, k):
    plain = chat(model, COPY, temperature=0, max_tokens=60, ignore_eos=True)
    spec = chat(model, COPY, temperature=0, max_tokens=60, ignore_eos=True, speculative="ngram", spec_tokens=k)
    assert spec.token_ids == plain.token_ids
    assert spec.text == plain.text
    assert spec.finish_reason == plain.finish_reason == "length"
    assert spec.draft_tokens > 0 and 0 < spec.accepted_tokens <= spec.draft_tokens
    assert plain.draft_tokens == plain.accepted_tokens == 0


def test_greedy_equals_plain_with_stop_logprobs_penalties_and_limits(model):
    plain = chat(model, COPY, temperature=0, max_tokens=45, ignore_eos=True)
    stop = plain.text[-12:-6]  # met late in the answer, maybe inside an accepted draft
    for options in [
        dict(stop=stop),
        dict(logprobs=3),
        dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3),
        dict(max_tokens=7),
    ]:
        base = dict(temperature=0, max_tokens=45, ignore_eos=True) | options
        expected = chat(model, COPY, **base)
        got = chat(model, COPY, speculative="ngram", spec_tokens=6, **base)
        assert (got.token_ids, got.text, got.finish_reason) == (
            expected.token_ids,
            expected.text,
            expected.finish_reason,
        )
        if "logprobs" in options:
            assert [e.token_id for e in got.logprobs] == [e.token_id for e in expected.logprobs]
            assert [e.logprob for e in got.logprobs] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-4)


def test_greedy_equals_plain_with_a_grammar(model):
    options = dict(temperature=0, max_tokens=40, regex=r"(ab|cd){3,12}")
    expected = chat(model, COPY, **options)
    got = chat(model, COPY, speculative="ngram", spec_tokens=5, **options)
    assert got.token_ids == expected.token_ids and got.text == expected.text


def test_greedy_equals_plain_with_an_image(make_vl, tmp_path):
    model = qwenvl.load(make_vl("qwen2_vl-d2", **VL_SHAPE))
    path = tmp_path / "image.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, size=(90, 120, 3)).astype(np.uint8)).save(path)
    content = [{"type": "image", "image": str(path)}, {"type": "text", "text": COPY}]
    plain = chat(model, content, temperature=0, max_tokens=50, ignore_eos=True)
    spec = chat(model, content, temperature=0, max_tokens=50, ignore_eos=True, speculative="ngram", spec_tokens=5)
    assert spec.token_ids == plain.token_ids
    assert spec.draft_tokens > 0


def test_batching_engine_with_speculation_equals_each_alone(model):
    contents = [COPY, COPY.replace("add", "mul"), "Count: 1 2 3 1 2 3 1 2 3 1 2", "Hello there."]
    expected = [chat(model, c, temperature=0, max_tokens=30 + i, ignore_eos=True) for i, c in enumerate(contents)]
    engine = BatchEngine(model, max_batch=4, speculation=Speculation("ngram", 6))  # 4 rows + drafts > MAX_ROWS
    try:
        prompts = [model.prepare([{"role": "user", "content": c}]) for c in contents]
        handles = [engine.submit(p, temperature=0, max_tokens=30 + i, ignore_eos=True) for i, p in enumerate(prompts)]
        results = [handle.result() for handle in handles]
        events = [list(handle.events(timeout=5)) for handle in handles]
    finally:
        engine.shutdown()
    assert [r.token_ids for r in results] == [e.token_ids for e in expected]
    assert [[t for event in stream for t in event.token_ids] for stream in events] == [e.token_ids for e in expected]
    assert any(len(event.token_ids) > 1 for stream in events for event in stream)  # a step gave several tokens
    stats = engine.stats()
    assert stats["draft_tokens"] == sum(r.draft_tokens for r in results) > 0
    assert stats["accepted_tokens"] == sum(r.accepted_tokens for r in results) > 0
    assert stats["decode_tokens"] == sum(len(r.token_ids) - 1 for r in results)


def test_speculation_over_the_prefix_cache_and_forked_choices(model, make_qwen2):
    """A prompt served from the prefix cache, and n = 2 choices forking its blocks, both speculating
    (rejected rows rolled back over shared blocks): the greedy tokens of a cold plain run, and the
    cached prompt blocks stay valid for later requests."""
    cold = qwenvl.load(make_qwen2("untied-gqa2", **TEXT_SHAPE), prefix_cache=False)
    want = chat(cold, COPY, temperature=0, max_tokens=40, ignore_eos=True).token_ids
    first = chat(model, COPY, temperature=0, max_tokens=40, ignore_eos=True, speculative="ngram", spec_tokens=6)
    again = chat(model, COPY, temperature=0, max_tokens=40, ignore_eos=True, speculative="ngram", spec_tokens=6)
    assert again.cached_tokens >= 16 and again.accepted_tokens > 0
    assert first.token_ids == again.token_ids == want
    engine = BatchEngine(model, max_batch=4, speculation=Speculation("ngram", 6))
    try:
        prompt = model.prepare([{"role": "user", "content": COPY}])
        handles = engine.submit_choices(prompt, 2, temperature=0, max_tokens=40, ignore_eos=True)
        results = [handle.result() for handle in handles]
    finally:
        engine.shutdown()
    assert [r.token_ids for r in results] == [want, want]
    assert all(r.accepted_tokens > 0 for r in results)
    assert chat(model, COPY, temperature=0, max_tokens=40, ignore_eos=True).token_ids == want
    stats = model.kv_pool.stats()
    assert stats["blocks_used"] == 0  # every block came back


def test_drafts_take_only_the_kv_blocks_the_pool_can_spare(model):
    """``speculative.room``: the draft tokens that fit the request's blocks plus the spare ones."""
    prompt = model.prepare([{"role": "user", "content": COPY}])
    params = sampling_params(model.generation_config, temperature=0, max_tokens=8)
    req = new_request(model.text_model, model.tokenizer, prompt, params, [], model.context, pool=model.kv_pool)
    try:
        with torch.inference_mode():
            req.output_ids.append(int(prefill(model.text_model, req).argmax()))
        size, end = model.kv_pool.block_size, req.next_start + 1  # the plain row's end
        held = -(-end // size)
        assert speculative.room(req, 0) == held * size - end
        assert speculative.room(req, 2) == (held + 2) * size - end
        assert speculative.new_blocks(req, 1 + speculative.room(req, 1)) == held + 1 - len(req.cache.blocks)
        history = torch.tensor([*prompt.input_ids, *req.output_ids])
        req.speculation = Speculation("ngram", speculative.MAX_TOKENS)
        assert len(speculative.draft(req, history, spare_blocks=0)) <= held * size - end
    finally:
        req.release_cache()


def test_server_with_speculation_reports_it_in_metrics(model):
    import requests
    from prometheus_client.parser import text_string_to_metric_families
    from test_server_support import LiveServer

    from qwenvl.server import ServerSettings, create_app

    expected = chat(model, COPY, temperature=0, max_tokens=40, ignore_eos=True)
    app = create_app(model, ServerSettings(model_id="tiny"), speculation=Speculation("ngram", 5))
    body = {"messages": [{"role": "user", "content": COPY}], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with LiveServer(app) as server:
        answer = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120).json()
        text = requests.get(server.base_url + "/metrics", timeout=30).text
    assert answer["choices"][0]["message"]["content"] == expected.text
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    drafted, kept = values["qwenvl_spec_draft_tokens_total"], values["qwenvl_spec_accepted_tokens_total"]
    assert drafted > 0 and 0 < kept <= drafted
    assert values["qwenvl_spec_acceptance_rate"] == pytest.approx(kept / drafted)
    assert values["qwenvl_decode_tokens_total"] == 39 and values["qwenvl_decode_tokens_per_second"] > 0


# -- sampling: the exact distribution ----------------------------------------------------------------


def _chi_square_p(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """p-value of Pearson's chi-square test of counts against probabilities (bins of p ≈ 0 merged)."""
    keep = expected_probs > 1e-9
    assert observed[~keep].sum() == 0, "a token of probability 0 was drawn"
    counts, probs = observed[keep], expected_probs[keep] / expected_probs[keep].sum()
    expected = probs * counts.sum()
    statistic = float(((counts - expected) ** 2 / expected).sum())
    df = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(statistic / 2.0)))


def test_sampled_tokens_keep_the_exact_distribution(model):
    """Rows of real logits from the tiny model with a draft of its 2nd and 1st most likely tokens: over
    many draws the first emitted token follows p0, and the next one (after the draft token was kept)
    follows p1, p = softmax(top-k(logits / T)), both the kept and the rejected paths taken."""
    temperature, top_k = 1.3, 6
    params = sampling_params(model.generation_config, temperature=temperature, top_k=top_k, max_tokens=8, seed=1234)
    prompt = model.prepare([{"role": "user", "content": COPY}])
    req = new_request(model.text_model, model.tokenizer, prompt, params, [], model.context, pool=model.kv_pool)
    with torch.inference_mode():
        first = prefill(model.text_model, req)
        req.output_ids.append(int(first.argmax()))
        probe = speculative.forward_rows(model.text_model, [req], [[0]])[0]
        guess = [int(probe[0].topk(2).indices[1]), 0]
        guess[1] = int(speculative.forward_rows(model.text_model, [req], [guess[:1]])[0][1].argmax())
        rows = speculative.forward_rows(model.text_model, [req], [guess])[0]
    # the rows cut to the 24 best tokens of each (fast draws; the sampler does not care about the vocab)
    keep = torch.unique(torch.cat([rows[0].topk(24).indices, rows[1].topk(24).indices]))
    rows, guess = rows[:, keep], [int((keep == token).nonzero()) for token in guess]
    p = [torch.softmax(top_k_filter(rows[j] / temperature, top_k), -1).numpy().astype(np.float64) for j in range(2)]
    assert 0.05 < p[0][guess[0]] < 0.95  # both paths are exercised
    history = torch.empty(len(prompt.input_ids) + req.max_new_tokens, dtype=torch.long)
    base = list(req.output_ids)
    first_counts, second_counts = np.zeros(len(keep)), np.zeros(len(keep))
    for _ in range(3000):
        req.output_ids, req.finish_reason, req.text = list(base), None, ""
        tokens, _ = speculative.take(req, rows, guess, history)
        first_counts[tokens[0]] += 1
        if tokens[0] == guess[0]:
            second_counts[tokens[1]] += 1
    assert _chi_square_p(first_counts, p[0]) > 1e-3
    assert _chi_square_p(second_counts, p[1]) > 1e-3
    assert second_counts.sum() > 250


def test_draw_rejection_rule_is_exact_on_a_small_distribution():
    probs = torch.tensor([0.5, 0.2, 0.2, 0.1])
    generator = torch.Generator().manual_seed(7)
    counts = np.zeros(4)
    for _ in range(4000):
        counts[speculative.draw(probs, 1, generator)] += 1
    assert _chi_square_p(counts, probs.numpy().astype(np.float64)) > 1e-3
    assert speculative.draw(torch.tensor([0.0, 1.0]), 1, generator) == 1  # certain: always kept


# -- flags and refusals -----------------------------------------------------------------------------


def test_bad_speculative_options_are_refused_by_name(model):
    for options, message in [
        (dict(speculative="eagle"), "speculative: unknown method 'eagle'"),
        (dict(speculative="ngram", spec_tokens=0), "spec_tokens must be an integer in 1"),
        (dict(speculative="ngram", spec_tokens=speculative.MAX_TOKENS + 1), "spec_tokens must be an integer in 1"),
        (dict(speculative="ngram", spec_tokens="4"), "spec_tokens must be an integer in 1"),
        (dict(spec_tokens=3), "spec_tokens needs speculative='ngram'"),
    ]:
        with pytest.raises(RequestError, match=message):
            chat(model, "Hi", max_tokens=2, **options)


def test_cli_run_speculative_json(model, make_qwen2, capsys):
    path = str(make_qwen2("untied-gqa2", **TEXT_SHAPE))
    common = ["run", path, "-p", COPY, "--temperature", "0", "--max-tokens", "40", "--json"]
    assert cli_main(common) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "speculative" not in plain
    assert cli_main([*common, "--speculative", "ngram", "--spec-tokens", "4"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["tokens"] == plain["tokens"]
    figures = spec["speculative"]
    assert figures["acceptance_rate"] == round(figures["accepted_tokens"] / figures["draft_tokens"], 4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--spec-tokens", "3"], "--spec-tokens goes with --speculative ngram"),
        (["--speculative", "ngram", "--spec-tokens", "16"], "--spec-tokens must be in 1 … 15, got 16"),
    ],
)
def test_cli_bad_flags_fail_before_loading(flags, message, capsys):
    assert cli_main(["run", "/nonexistent/model", "-p", "hi", *flags]) != 0
    assert message in capsys.readouterr().err


def test_cli_help_states_the_engine_limits(capsys):
    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default {speculative.DEFAULT_TOKENS}, 1 … {speculative.MAX_TOKENS}" in text
