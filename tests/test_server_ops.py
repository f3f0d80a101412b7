"""Operations endpoints: /metrics (parsed with prometheus_client's parser; counters move by exactly the
requests made), /tokenize and /detokenize in vLLM's shape, /v1/models/{id}, --cors-origins."""

from __future__ import annotations

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from test_server_support import data_uri, live_server, png_bytes

import qwenvl

MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def model(make_vl):
    return qwenvl.load(make_vl("default"), dtype="float32")


@pytest.fixture(scope="module")
def server(model):
    with live_server(model, max_batch=2) as running:
        yield running


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) → value."""
    response = requests.get(server.base_url + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_counters_move_by_the_requests_made(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    before = scrape(server)
    usage = []
    for stream in (False, False, True):
        if stream:
            chunks = list(client.chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=3, temperature=0, stream=True,
                stream_options={"include_usage": True},
            ))  # fmt: skip
            usage.append(chunks[-1].usage)
        else:
            usage.append(
                client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, temperature=0).usage
            )
    usage.append(client.completions.create(model="m", prompt="Once upon", max_tokens=2, temperature=0).usage)
    bad = requests.post(server.base_url + "/v1/chat/completions", json={"messages": []}, timeout=30)
    assert bad.status_code == 400
    after = scrape(server)
    chat = dict(method="POST", route="/v1/chat/completions")
    assert delta(before, after, "qwenvl_http_requests_total", **chat, status="200") == 3
    assert delta(before, after, "qwenvl_http_requests_total", **chat, status="400") == 1
    assert delta(before, after, "qwenvl_http_requests_total", method="POST", route="/v1/completions", status="200") == 1
    assert delta(before, after, "qwenvl_http_requests_total", method="GET", route="/metrics", status="200") == 1
    assert delta(before, after, "qwenvl_prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert delta(before, after, "qwenvl_generation_tokens_total") == sum(u.completion_tokens for u in usage)
    finished = sum(delta(before, after, "qwenvl_requests_finished_total", finish_reason=r) for r in ("stop", "length"))
    assert finished == 4
    assert delta(before, after, "qwenvl_time_to_first_token_seconds_count") == 4
    assert delta(before, after, "qwenvl_e2e_request_latency_seconds_count") == 4
    tokens_after_first = sum(u.completion_tokens - 1 for u in usage)
    assert delta(before, after, "qwenvl_time_per_output_token_seconds_count") == tokens_after_first
    for gauge in ("qwenvl_requests_running", "qwenvl_requests_waiting", "qwenvl_kv_cache_bytes"):
        assert after[(gauge, ())] == 0
    assert delta(before, after, "qwenvl_engine_steps_total") >= tokens_after_first / 2
    # the same conversation three times: the 2nd and 3rd take its full blocks from the prefix cache
    assert delta(before, after, "qwenvl_prefix_cache_hit_tokens_total") >= 2 * (usage[0].prompt_tokens // 16 * 16)
    assert delta(before, after, "qwenvl_prefix_cache_queried_tokens_total") == sum(u.prompt_tokens - 1 for u in usage)
    assert after[("qwenvl_kv_cache_blocks_used", ())] == 0 and after[("qwenvl_kv_cache_blocks_cached", ())] > 0


def test_tokenize_and_detokenize(server, model):
    url = server.base_url
    text = "Hello, wörld <|im_end|>"
    answer = requests.post(url + "/tokenize", json={"prompt": text, "return_token_strs": True}, timeout=30).json()
    assert answer["tokens"] == model.tokenizer.encode(text) and answer["count"] == len(answer["tokens"])
    assert answer["max_model_len"] == model.context and "".join(answer["token_strs"]) == text
    back = requests.post(url + "/detokenize", json={"tokens": answer["tokens"]}, timeout=30).json()
    assert back == {"prompt": text}
    # messages with an image: the count is what a chat request's usage says
    image = {"type": "image_url", "image_url": {"url": data_uri(png_bytes(84, 56, seed=5))}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]
    counted = requests.post(url + "/tokenize", json={"messages": messages}, timeout=60).json()
    chat = requests.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=60).json()
    assert counted["count"] == chat["usage"]["prompt_tokens"] == len(counted["tokens"])
    assert counted["tokens"] == model.prepare(
        [{"role": "user", "content": [{"type": "image", "image": png_bytes(84, 56, seed=5)}, {"type": "text", "text": "What is it?"}]}]
    ).input_ids  # fmt: skip
    without = requests.post(url + "/tokenize", json={"messages": messages, "add_generation_prompt": False}, timeout=60)
    assert without.json()["count"] == counted["count"] - 3  # "<|im_start|>assistant\n"
    for body, words in [
        ({}, "either prompt or messages"),
        ({"prompt": "a", "messages": MESSAGES}, "either prompt or messages"),
        ({"prompt": "a", "unknown": 1}, "Extra inputs"),
        ({"prompt": "a", "tools": [{"type": "function", "function": {"name": "f"}}]}, "go with messages"),
        ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "no tool section"),
    ]:
        response = requests.post(url + "/tokenize", json=body, timeout=30)
        assert response.status_code == 400 and words in response.json()["error"]["message"], response.text
    bad = requests.post(url + "/detokenize", json={"tokens": [1, 151936]}, timeout=30)
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]


def test_one_model_card(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.owned_by == "qwenvl"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")
    missing = requests.get(server.base_url + "/v1/models/other-model", timeout=30).json()["error"]
    assert missing["code"] == "model_not_found" and missing["type"] == "not_found_error"


def test_cors_origins_and_keys(model):
    origin = "http://localhost:3000"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    with live_server(model, api_key="secret", cors_origins=(origin,)) as running:
        url = running.base_url + "/v1/chat/completions"
        answer = requests.options(url, headers=preflight, timeout=30)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
        other = requests.options(url, headers={**preflight, "Origin": "http://evil.example"}, timeout=30)
        assert "access-control-allow-origin" not in other.headers
        # the key is still wanted on real requests, and on /tokenize and /detokenize too
        assert (
            requests.post(url, json={"messages": MESSAGES}, headers={"Origin": origin}, timeout=30).status_code == 401
        )
        for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
            assert requests.post(running.base_url + path, json=body, timeout=30).status_code == 401
            keyed = {"Authorization": "Bearer secret"}
            assert requests.post(running.base_url + path, json=body, headers=keyed, timeout=30).status_code == 200
        # every route but /health wants the key (issue 23): /metrics too; Prometheus sends it as a bearer token
        assert requests.get(running.base_url + "/metrics", timeout=30).status_code == 401
        keyed = {"Authorization": "Bearer secret"}
        assert requests.get(running.base_url + "/metrics", headers=keyed, timeout=30).status_code == 200
    with live_server(model) as running:  # no --cors-origins: no CORS headers at all
        answer = requests.options(running.base_url + "/v1/chat/completions", headers=preflight, timeout=30)
        assert "access-control-allow-origin" not in answer.headers
