"""Property-based fuzz of request bodies (hypothesis, and schemathesis from the server's own OpenAPI
schema): whatever the body (random schemas, tools, tool_choice, logprobs and the other fields included),
the server answers within a timeout, never with a 5xx, always with an OpenAI error body when it refuses,
and leaks no request. Sampling fields are drawn from the whole float range too. The schemathesis corpus
is marked ``fuzz`` (``make test-fuzz``); a fixed-seed sample runs here."""

from __future__ import annotations

import json
import time

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_support import data_uri, live_server, png_bytes

import qwenvl

EXAMPLES = 150
TIMEOUT_S = 30
IMAGE_URI = data_uri(png_bytes(28, 28, seed=9))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)

# -- well-typed bodies: every field within the schema, so requests reach the media, template and engine layers
urls = st.sampled_from(
    [
        IMAGE_URI,
        IMAGE_URI,
        IMAGE_URI,
        "data:image/png;base64,AAAA",
        "data:image/png;base64,@@",
        "data:,",
        "",
        "http://localhost/x.png",
        "http://169.254.169.254/latest",
        "file:///etc/passwd",
        "ftp://host/x",
        "/etc/passwd",
        "data:video/mp4;base64,AAAA",
        "data:image/png;base64," + "A" * 40,
    ]
)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": urls | st.fixed_dictionaries({"url": urls})}),
    st.fixed_dictionaries(
        {"type": st.just("video_url"), "video_url": st.fixed_dictionaries({"url": urls})},
        optional={"nframes": st.integers(-2, 8), "fps": st.floats(0, 4), "max_pixels": st.integers(0, 10**5)},
    ),
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "user", "assistant", "tool"])},
        optional={"content": st.text(max_size=40) | st.lists(parts, max_size=3) | st.none()},
    ),
    min_size=1,
    max_size=3,
)
# Mostly in range, sometimes anywhere in the float range (subnormals and the extremes included).
any_float = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True)


def in_range_or_any(low: float, high: float):
    return st.floats(low, high, allow_subnormal=True) | any_float


# -- structured outputs and tools: random schemas, tools and choices (valid ones reach llguidance)
names = st.sampled_from(["f", "get_weather", "lookup", "a.b-c_d", "bad name", ""])
leaf_schemas = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["integer", "number", "boolean", "null", "string", "strin"])}),
    st.fixed_dictionaries({"type": st.just("integer"), "minimum": st.integers(-5, 5), "maximum": st.integers(-5, 9)}),
    st.fixed_dictionaries({"enum": st.lists(st.text(max_size=4) | st.integers(), min_size=1, max_size=3)}),
    st.fixed_dictionaries({"type": st.just("string"), "maxLength": st.integers(0, 4)}),
    st.fixed_dictionaries({"type": st.just("string"), "pattern": st.sampled_from(["^[a-z]{1,3}$", "(", "[0-9]+"])}),
    st.fixed_dictionaries({"$ref": st.sampled_from(["#/nope", "#"])}),
    json_values,
)
schemas = st.recursive(
    leaf_schemas,
    lambda inner: (
        st.fixed_dictionaries(
            {
                "type": st.just("object"),
                "properties": st.dictionaries(st.text("abc", min_size=1, max_size=3), inner, max_size=3),
            },
            optional={
                "required": st.lists(st.text("abc", min_size=1, max_size=3), max_size=2),
                "additionalProperties": st.booleans(),
            },
        )  # fmt: skip
        | st.fixed_dictionaries({"type": st.just("array"), "items": inner}, optional={"maxItems": st.integers(0, 3)})
        | st.fixed_dictionaries({"anyOf": st.lists(inner, min_size=1, max_size=2)})
    ),
    max_leaves=6,
)
tools = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["function", "function", "custom"]),
            "function": st.fixed_dictionaries(
                {"name": names}, optional={"parameters": schemas, "description": st.text(max_size=10)}
            ),
        }  # fmt: skip
    ),
    max_size=3,
)
tool_choices = st.sampled_from(["none", "auto", "required", "sometimes"]) | st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": names})}
)
response_formats = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"])}),
    st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries(
                {"name": st.text(max_size=8)}, optional={"schema": schemas, "strict": st.booleans()}
            ),
        }  # fmt: skip
    ),
)
structured_outputs = st.fixed_dictionaries(
    {},
    optional={
        "json": schemas,
        "regex": st.sampled_from(["[a-z]{2}", "(", "\\d+", "a|b"]),
        "choice": st.lists(st.text(max_size=5), max_size=3),
        "grammar": st.sampled_from(['start: "x"', "start: nope", 'root ::= "a"']),
        "json_object": st.booleans(),
    },
)
output_fields = {
    "response_format": response_formats,
    "structured_outputs": structured_outputs,
    "logit_bias": st.dictionaries(st.integers(0, 160_000).map(str), st.floats(-100, 100), max_size=3),
}

sampling = {
    "model": st.text(max_size=10),
    "max_tokens": st.integers(1, 12),
    "temperature": in_range_or_any(0, 2),
    "top_p": in_range_or_any(5e-324, 1),
    "top_k": st.integers(-1, 50) | st.integers(-(2**70), 2**70),
    "min_p": in_range_or_any(0, 1),
    "repetition_penalty": in_range_or_any(5e-324, 1.7976931348623157e308),
    "presence_penalty": in_range_or_any(-2, 2),
    "frequency_penalty": in_range_or_any(-2, 2),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
}
chat_bodies = st.fixed_dictionaries(
    {"messages": messages},
    optional={
        **sampling,
        **output_fields,
        "tools": tools,
        "tool_choice": tool_choices,
        "parallel_tool_calls": st.booleans(),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(-1, 21),
        "max_completion_tokens": st.integers(1, 12),
        "mm_processor_kwargs": st.fixed_dictionaries(
            {},
            optional={
                "min_pixels": st.integers(1, 2 * 10**5),
                "max_pixels": st.integers(1, 10**6),
                "fps": st.floats(0.01, 10),
                "nframes": st.integers(1, 8),
            },
        ),
    },
)
completion_bodies = st.fixed_dictionaries(
    {
        "prompt": st.text(max_size=40)
        | st.lists(st.integers(0, 151_000), max_size=8)
        | st.lists(st.text(max_size=10), min_size=1, max_size=1)
    },
    optional={**sampling, **output_fields, "logprobs": st.integers(-1, 21), "echo": st.booleans()},
)

# -- anything at all, JSON or not: the schema layer
junk_bodies = (
    st.dictionaries(
        st.sampled_from(
            [
                "messages",
                "prompt",
                *sampling,
                "n",
                "logprobs",
                "echo",
                "mm_processor_kwargs",
                *output_fields,
                "tools",
                "tool_choice",
                "top_logprobs",
                "audio",
                "store",
                "guided_json",
            ]
        ),  # fmt: skip
        json_values,
        max_size=6,
    )
    | json_values
)


@pytest.fixture(scope="module")
def server(make_vl):
    model = qwenvl.load(make_vl("default"), dtype="float32", context=192)
    with live_server(
        model,
        max_batch=4,
        default_max_tokens=6,
        mm_limits={"image": 2, "video": 1},
        allowed_media_domains=("localhost",),
        media_timeout=2.0,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def text_server(make_qwen2):
    model = qwenvl.load(make_qwen2("default"), dtype="float32", context=256)
    with live_server(model, max_batch=4, default_max_tokens=6) as running:
        yield running


def check(server, path: str, data: bytes) -> None:
    """Within the timeout; no 5xx; an error body on refusal; a complete answer (or SSE stream) otherwise."""
    started = time.monotonic()
    response = requests.post(
        server.base_url + path, data=data, headers={"Content-Type": "application/json"}, timeout=TIMEOUT_S
    )
    assert time.monotonic() - started < TIMEOUT_S
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text
    else:
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


@FUZZ_SETTINGS
@given(body=chat_bodies)
def test_fuzz_chat_completions(server, body):
    check(server, "/v1/chat/completions", json.dumps(body).encode())


@settings(FUZZ_SETTINGS, max_examples=80)
@given(
    body=st.fixed_dictionaries(
        {"messages": st.just([{"role": "user", "content": "Go"}])},
        optional={
            **output_fields,
            "tools": tools,
            "tool_choice": tool_choices,
            "stream": st.booleans(),
            "temperature": st.floats(0, 2),
            "seed": st.integers(0, 99),
            "max_tokens": st.integers(1, 8),
        },
    )  # fmt: skip
)
def test_fuzz_structured_outputs_and_tools(text_server, body):
    """Random schemas, tools and choices on a model whose template has tools: the valid ones reach
    llguidance and the engine."""
    check(text_server, "/v1/chat/completions", json.dumps(body).encode())


@settings(FUZZ_SETTINGS, max_examples=100)
@given(body=completion_bodies)
def test_fuzz_completions(server, body):
    check(server, "/v1/completions", json.dumps(body).encode())


@settings(FUZZ_SETTINGS, max_examples=100)
@given(body=junk_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_fuzz_junk_bodies(server, body, path):
    check(server, path, json.dumps(body).encode())


@settings(FUZZ_SETTINGS, max_examples=60)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzz_raw_bytes(server, data):
    check(server, "/v1/chat/completions", data)


def _schemathesis_run(server, examples: int) -> None:
    """Valid and invalid bodies generated from /openapi.json for both routes: never a 5xx or a hang."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(requests.get(server.base_url + "/openapi.json", timeout=10).json())
    for path in ("/v1/chat/completions", "/v1/completions"):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(FUZZ_SETTINGS, max_examples=examples, database=None)
            @given(case=schema[path]["POST"].as_strategy(generation_mode=mode))
            def run(case):
                started = time.monotonic()
                response = case.call(base_url=server.base_url, timeout=TIMEOUT_S)
                assert time.monotonic() - started < TIMEOUT_S
                assert response.status_code < 500, (case.body, response.text)

            run()


def test_schemathesis_sample(server):
    _schemathesis_run(server, 8)


@pytest.mark.fuzz
def test_schemathesis_corpus(server):
    _schemathesis_run(server, 150)


@pytest.mark.parametrize("which", ["server", "text_server"])
def test_nothing_left_running_after_the_fuzz(request, which):
    server = request.getfixturevalue(which)
    deadline = time.monotonic() + 10
    while True:
        health = requests.get(server.base_url + "/health", timeout=10).json()
        if (health["running"], health["waiting"], health["kv_cache_bytes"]) == (0, 0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (health["running"], health["waiting"], health["kv_cache_bytes"]) == (0, 0, 0)
