"""The chat page of `qwenvl serve` and the `qwenvl` extension of chat responses, on a live 127.0.0.1 server
over a tiny random Qwen2-VL checkpoint.

The browser tests drive Debian's chromium (/usr/bin/chromium, `apt-get install chromium`) with Playwright
for Python; they skip, saying so, where either is missing. Every request the browser makes is checked by
a route handler: anything not addressed to the test server is aborted and fails the test. Answers with
boxes, HTML or a long text come from the real server with the next-token choice scripted
(tests/scripted.py), because the tiny model's weights are random.

`QWENVL_SCREENSHOT=path.png` makes test_grounding_is_drawn_over_the_image save its screenshot there
(`make screenshot` writes docs/chat-page.png, the README's picture).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
import urllib.parse
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
from PIL import Image, ImageDraw
from scripted import script_answer
from test_server_support import data_uri, live_server, png_bytes, sse_payloads, video_file

import qwenvl
from qwenvl.server.ui import CONTENT_SECURITY_POLICY

CHROMIUM = "/usr/bin/chromium"
# Headless, no sandbox (root in CI), and none of chromium's own background traffic (component updates,
# safe browsing, sync, first-run fetches): this machine refuses outside connections.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
]
MAX_TOKENS = 12
BOX_ANSWER = "<|object_ref_start|>the red ball<|object_ref_end|><|box_start|>(312,402),(598,795)<|box_end|>"


@pytest.fixture(scope="module")
def model(make_vl):
    return qwenvl.load(make_vl("default"), dtype="float32")


@pytest.fixture(scope="module")
def server(model):
    with live_server(model, max_batch=2) as running:
        yield running


def greedy(server, messages, max_tokens=MAX_TOKENS, headers=None):
    """The API's own answer to ``messages`` (non-streamed, greedy)."""
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def ball_picture(path: Path, width: int = 480, height: int = 320) -> Path:
    """A picture worth a box: a red ball on grass under a sky."""
    image = Image.new("RGB", (width, height), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(height * 0.62), width, height), fill=(96, 160, 72))
    draw.ellipse((int(width * 0.33), int(height * 0.42), int(width * 0.58), int(height * 0.78)), fill=(214, 40, 40))
    draw.ellipse((int(width * 0.75), int(height * 0.08), int(width * 0.88), int(height * 0.27)), fill=(250, 220, 90))
    image.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# the server side, no browser


def test_the_page_and_its_files_are_served(server):
    page = requests.get(server.base_url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "connect-src 'self'" in CONTENT_SECURITY_POLICY and "script-src 'self'" in CONTENT_SECURITY_POLICY
    for hook in ("prompt", "attach", "send", "stop", "error"):
        assert f'data-testid="{hook}"' in page.text
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)  # nothing from elsewhere
    for name, kind in (("app.js", "javascript"), ("markdown.js", "javascript"), ("style.css", "text/css")):
        asset = requests.get(f"{server.base_url}/ui/{name}", timeout=10)
        assert asset.status_code == 200 and kind in asset.headers["content-type"]
        assert not re.search(r"https?://[\w-]+\.", asset.text), name  # no CDN, no remote host
    assert requests.get(server.base_url + "/ui/nothing.js", timeout=10).status_code == 404
    assert requests.get(server.base_url + "/ui/../app.py", timeout=10).status_code == 404


def test_no_ui_leaves_the_api_only(model):
    with live_server(model, max_batch=1, ui=False) as bare:
        assert requests.get(bare.base_url + "/", timeout=10).status_code == 404
        assert requests.get(bare.base_url + "/ui/app.js", timeout=10).status_code == 404
        assert requests.get(bare.base_url + "/health", timeout=10).status_code == 200


def test_with_an_api_key_the_page_is_public_and_the_api_is_not(model):
    key = "sk-test-7f3a"
    with live_server(model, max_batch=1, api_key=key) as guarded:
        page = requests.get(guarded.base_url + "/", timeout=10)
        assert page.status_code == 200 and key not in page.text
        for name in ("app.js", "api.js", "style.css", "icon.svg"):
            asset = requests.get(f"{guarded.base_url}/ui/{name}", timeout=10)
            assert asset.status_code == 200 and key not in asset.text
        assert requests.get(guarded.base_url + "/v1/models", timeout=10).status_code == 401
        authorized = {"Authorization": f"Bearer {key}"}
        assert requests.get(guarded.base_url + "/v1/models", headers=authorized, timeout=10).status_code == 200


def test_chat_responses_carry_image_sizes(server):
    image = png_bytes(101, 67, seed=4)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}}, {"type": "text", "text": "Hi"}],
        }
    ]
    body = greedy(server, messages)
    assert body["qwenvl"] == {
        "images": [{"index": 0, "original": {"width": 101, "height": 67}, "resized": {"width": 112, "height": 56}}],
        "boxes": [],
    }
    text_only = greedy(server, [{"role": "user", "content": "Hi"}])
    assert text_only["qwenvl"] == {"images": [], "boxes": []}
    completion = requests.post(server.base_url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert "qwenvl" not in completion.json()  # no images there


def test_boxes_in_the_response_and_the_finish_chunk(server, model, monkeypatch):
    script_answer(monkeypatch, model.tokenizer, BOX_ANSWER)
    image = png_bytes(480, 320, seed=5)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(image)}},
                {"type": "text", "text": "Where is the ball?"},
            ],
        }
    ]
    expected_box = [149.76, 128.64, 287.04, 254.4]
    body = greedy(server, messages, max_tokens=64)
    assert body["choices"][0]["message"]["content"] == "the red ball(312,402),(598,795)"
    (box,) = body["qwenvl"]["boxes"]
    assert box["box"] == expected_box and box["label"] == "the red ball" and box["convention"] == "normalized_1000"
    stream = requests.post(
        server.base_url + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 64, "stream": True, "stream_options": {"include_usage": True}},
        timeout=60,
    )
    payloads = sse_payloads(stream.text)
    finish = [p for p in payloads if isinstance(p, dict) and p.get("choices") and p["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["qwenvl"]["boxes"][0]["box"] == expected_box
    assert all("qwenvl" not in p for p in payloads if isinstance(p, dict) and p is not finish[0])
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    parsed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=64)
    assert parsed.choices[0].message.content == "the red ball(312,402),(598,795)"  # the client is unbothered
    assert parsed.model_extra["qwenvl"]["boxes"][0]["box"] == expected_box


# ----------------------------------------------------------------------------------------------
# the browser


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser tests need the playwright package (pip install playwright; .ci/run installs it)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"the browser tests need {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    with sync_playwright() as playwright:
        # launch() gives every run a fresh temporary profile (user-data-dir)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


class PageGuard:
    """Every request of a browser context: local ones go through, any other is aborted and recorded."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.requests: list[tuple[str, str]] = []
        self.refused: list[str] = []
        self.errors: list[str] = []
        self.chat_bodies: list[dict] = []
        self.chat_headers: list[dict] = []

    def __call__(self, route, request) -> None:
        url = request.url
        self.requests.append((request.method, url))
        host = urllib.parse.urlsplit(url).hostname
        if host != "127.0.0.1" or not url.startswith(self.base_url + "/"):
            self.refused.append(url)
            route.abort()
            return
        if url.endswith("/v1/chat/completions"):
            self.chat_bodies.append(json.loads(request.post_data or "{}"))
            self.chat_headers.append(dict(request.headers))
        route.continue_()


@pytest.fixture
def open_page(browser):
    """open_page(server) → (page, guard); afterwards: no outside request, no script error on the page."""
    opened = []

    def open_(server, viewport=(1100, 760)):
        context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        guard = PageGuard(server.base_url)
        context.route("**/*", guard)
        page = context.new_page()
        page.on("pageerror", lambda error: guard.errors.append(str(error)))
        page.on("console", lambda message: message.type == "error" and guard.errors.append(message.text))
        page.set_default_timeout(60_000)
        page.goto(server.base_url + "/")
        opened.append((context, guard))
        return page, guard

    yield open_
    for context, guard in opened:
        context.close()
        assert guard.refused == [], f"the page tried to reach outside the machine: {guard.refused}"
        assert all(url.startswith(guard.base_url + "/") for _, url in guard.requests)
        unexpected = [e for e in guard.errors if "status of 4" not in e]  # refused API calls log a 4xx
        assert unexpected == [], unexpected


def wait_for_answers(page, count):
    """The text of the count-th answer once it is finished (its statistics line shown)."""
    page.wait_for_function(
        "n => { const a = document.querySelectorAll('[data-testid=answer]');"
        " return a.length >= n && a[n - 1].querySelector('[data-testid=stats]').textContent !== ''; }",
        arg=count,
    )
    answer = page.locator("[data-testid=answer]").nth(count - 1)
    return answer.get_attribute("data-text"), answer.locator("[data-testid=stats]").inner_text()


def settings(page, **values):
    page.locator("#settings summary").click()
    for name, value in values.items():
        page.get_by_test_id(name).fill(str(value))


def test_two_turns_stream_the_greedy_answers_of_the_api(server, open_page, tmp_path):
    page, guard = open_page(server)
    page.wait_for_function("() => document.querySelector('[data-testid=model]').textContent === 'tiny'")
    settings(page, temperature=0, **{"max-tokens": MAX_TOKENS})
    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes(77, 45, seed=9))
    page.get_by_test_id("attach").set_input_files(str(picture))
    page.wait_for_selector("[data-testid=attachment]")
    page.get_by_test_id("prompt").fill("Describe this picture.")
    page.get_by_test_id("send").click()
    first, stats = wait_for_answers(page, 1)

    image_part = {"type": "image_url", "image_url": {"url": data_uri(picture.read_bytes())}}
    turn = [{"role": "user", "content": [image_part, {"type": "text", "text": "Describe this picture."}]}]
    expected = greedy(server, turn)
    assert first == expected["choices"][0]["message"]["content"] and first
    assert re.fullmatch(r"TTFT \d+\.\d\d s · (\d+\.\d tok/s · )?\d+ tokens?( · cut at max tokens)?", stats), stats
    assert f"{expected['usage']['completion_tokens']} token" in stats
    sent = guard.chat_bodies[0]
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == MAX_TOKENS
    assert sent["messages"] == turn

    page.get_by_test_id("prompt").fill("And the colours?")
    page.get_by_test_id("prompt").press("Enter")
    second, _ = wait_for_answers(page, 2)
    history = turn + [{"role": "assistant", "content": first}, {"role": "user", "content": "And the colours?"}]
    assert guard.chat_bodies[1]["messages"] == history
    assert second == greedy(server, history)["choices"][0]["message"]["content"]
    assert page.get_by_test_id("user-message").count() == 2
    assert page.get_by_test_id("error").is_hidden()

    page.get_by_test_id("new-chat").click()
    assert page.get_by_test_id("answer").count() == 0
    page.get_by_test_id("prompt").fill("Fresh start.")
    page.get_by_test_id("send").click()
    wait_for_answers(page, 1)
    assert guard.chat_bodies[2]["messages"] == [{"role": "user", "content": "Fresh start."}]
    page.reload()  # the settings stay, the conversation does not
    assert page.get_by_test_id("max-tokens").input_value() == str(MAX_TOKENS)
    assert page.get_by_test_id("answer").count() == 0


def test_video_drop_and_paste_attach(server, open_page, tmp_path):
    page, guard = open_page(server)
    settings(page, temperature=0, **{"max-tokens": 6})
    png = base64.b64encode(png_bytes(40, 30, seed=1)).decode()
    for event in ("drop", "paste"):
        page.evaluate(
            """([kind, data]) => {
                const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], kind + '.png', {type: 'image/png'}));
                if (kind === 'drop') {
                  document.querySelector('main').dispatchEvent(
                    new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
                } else {
                  document.querySelector('[data-testid=prompt]').dispatchEvent(
                    new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true, cancelable: true}));
                }
            }""",
            [event, png],
        )
    page.wait_for_function("() => document.querySelectorAll('[data-testid=attachment]').length === 2")
    page.locator("[data-testid=attachment] .remove").nth(1).click()  # take the pasted one back
    clip = video_file(tmp_path / "clip.mp4")
    page.get_by_test_id("attach").set_input_files(str(clip))
    page.wait_for_function("() => document.querySelectorAll('[data-testid=attachment]').length === 2")
    page.get_by_test_id("prompt").fill("What moves?")
    page.get_by_test_id("send").click()
    text, _ = wait_for_answers(page, 1)
    parts = guard.chat_bodies[0]["messages"][0]["content"]
    assert [part["type"] for part in parts] == ["image_url", "video_url", "text"]
    assert parts[0]["image_url"]["url"] == f"data:image/png;base64,{png}"
    assert parts[1]["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert text == greedy(server, guard.chat_bodies[0]["messages"], max_tokens=6)["choices"][0]["message"]["content"]


def test_stop_mid_answer(server, model, open_page, monkeypatch):
    script_answer(monkeypatch, model.tokenizer, "step " * 3000)  # far longer than anyone waits for
    page, _ = open_page(server)
    settings(page, **{"max-tokens": 4000})
    page.get_by_test_id("prompt").fill("Count for ever.")
    page.get_by_test_id("send").click()
    page.wait_for_function("() => (document.querySelector('[data-testid=answer]').dataset.text || '').length > 0")
    assert page.get_by_test_id("stop").is_visible() and page.get_by_test_id("send").is_disabled()
    page.get_by_test_id("stop").click()
    text, stats = wait_for_answers(page, 1)
    assert stats.endswith("stopped") and text.startswith("step")
    assert len(text) < len("step " * 3000)
    deadline = time.monotonic() + 10
    while requests.get(server.base_url + "/health", timeout=10).json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests.get(server.base_url + "/health", timeout=10).json()["running"] == 0  # the request was cancelled
    page.wait_for_timeout(300)
    assert page.locator("[data-testid=answer]").get_attribute("data-text") == text  # nothing more came
    assert page.get_by_test_id("stop").is_hidden() and page.get_by_test_id("send").is_enabled()


def test_refused_requests_show_the_servers_message(server, open_page, tmp_path):
    page, guard = open_page(server)
    settings(page, **{"max-tokens": 100000})
    page.get_by_test_id("prompt").fill("Tell me everything.")
    page.get_by_test_id("send").click()
    error = page.get_by_test_id("error")
    error.wait_for(state="visible")
    assert error.inner_text().startswith("max_tokens=100000 is beyond the context")
    assert page.get_by_test_id("answer").count() == 0  # the turn was taken back ...
    assert page.get_by_test_id("prompt").input_value() == "Tell me everything."  # ... and the text returned

    page.get_by_test_id("max-tokens").fill("4")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"this is not a picture")
    page.get_by_test_id("attach").set_input_files(str(fake))
    page.wait_for_selector("[data-testid=attachment]")
    page.get_by_test_id("send").click()
    page.wait_for_function("() => document.querySelector('[data-testid=error]').textContent.includes('not an image')")
    assert page.get_by_test_id("attachment").count() == 1  # kept, to remove or replace
    page.locator("[data-testid=attachment] .remove").click()
    page.get_by_test_id("send").click()
    wait_for_answers(page, 1)
    assert error.is_hidden()
    assert len(guard.chat_bodies) == 3


def test_html_in_user_and_model_text_shows_as_text(server, model, open_page, monkeypatch):
    answer = (
        'Look: <img src=x onerror="window.pwned=1"> <script>window.pwned=2</script>\n'
        "[click](javascript:window.pwned=3) and [docs](https://example.com/a) **bold** `<b>code</b>`\n\n"
        "```html\n<script>window.pwned=4</script>\n```\n\n- one <i>\n- two"
    )
    script_answer(monkeypatch, model.tokenizer, answer)
    page, _ = open_page(server)
    typed = '<img src=x onerror="window.pwned=5"><b>hi</b>'
    page.get_by_test_id("prompt").fill(typed)
    page.get_by_test_id("send").click()
    text, _ = wait_for_answers(page, 1)
    assert text == answer
    assert page.evaluate("window.pwned") is None
    messages = page.locator("#messages")
    assert messages.locator("img, script, b, i").count() == 0  # no element made from anyone's text
    assert page.get_by_test_id("user-message").inner_text() == typed
    shown = page.get_by_test_id("answer").locator(".markdown")
    assert '<img src=x onerror="window.pwned=1">' in shown.inner_text()
    assert shown.locator("strong").inner_text() == "bold"
    assert shown.locator("p code").inner_text() == "<b>code</b>"
    assert shown.locator("pre code").inner_text() == "<script>window.pwned=4</script>"
    assert shown.locator("li").all_inner_texts() == ["one <i>", "two"]
    links = shown.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.com/a"
    assert links.get_attribute("rel") == "noopener noreferrer"
    assert "[click](javascript:window.pwned=3)" in shown.inner_text()


def test_the_page_asks_for_the_api_key(model, open_page):
    key = "sk-page-51c2"
    with live_server(model, max_batch=1, api_key=key) as guarded:
        page, guard = open_page(guarded)
        page.get_by_test_id("api-key").wait_for(state="visible")
        assert "API key" in page.get_by_test_id("error").inner_text()
        assert key not in page.content()
        page.get_by_test_id("api-key").fill("wrong")
        page.get_by_test_id("save-key").click()
        page.wait_for_function("() => document.querySelector('[data-testid=error]').textContent.includes('refused')")
        page.get_by_test_id("api-key").fill(key)
        page.get_by_test_id("save-key").click()
        page.wait_for_function("() => document.querySelector('[data-testid=model]').textContent === 'tiny'")
        assert page.locator("#key-panel").is_hidden()
        settings(page, **{"max-tokens": 3})
        page.get_by_test_id("prompt").fill("Hello")
        page.get_by_test_id("send").click()
        wait_for_answers(page, 1)
        assert guard.chat_headers[0]["authorization"] == f"Bearer {key}"


def test_grounding_is_drawn_over_the_image(server, model, open_page, monkeypatch, tmp_path):
    script_answer(monkeypatch, model.tokenizer, BOX_ANSWER)
    page, _ = open_page(server, viewport=(960, 1180))
    settings(page, system="Answer briefly.", temperature=0, **{"max-tokens": 64})
    picture = ball_picture(tmp_path / "ball.png")
    page.get_by_test_id("attach").set_input_files(str(picture))
    page.get_by_test_id("prompt").fill("Find the red ball and give its bounding box.")
    page.get_by_test_id("send").click()
    text, _ = wait_for_answers(page, 1)
    assert text == "the red ball(312,402),(598,795)"
    figure = page.get_by_test_id("grounding")
    box = figure.get_by_test_id("box")
    assert box.count() == 1 and figure.get_by_test_id("box-label").inner_text() == "the red ball"
    style = box.get_attribute("style")
    for name, value in (("left", 31.2), ("top", 40.2), ("width", 28.6), ("height", 39.3)):
        found = re.search(rf"(?<![-\w]){name}: ([\d.]+)%", style)
        assert found and float(found.group(1)) == pytest.approx(value), (name, style)
    caption = figure.locator("figcaption").inner_text()
    assert "480×320 px" in caption and "resized to 476×308" in caption and "(150, 129, 287, 254)" in caption
    frame = figure.locator(".frame").bounding_box()
    drawn = box.bounding_box()
    assert drawn["x"] - frame["x"] == pytest.approx(frame["width"] * 0.312, abs=2)
    assert drawn["width"] == pytest.approx(frame["width"] * 0.286, abs=2)
    shot = tmp_path / "chat-page.png"
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(shot))
    assert Image.open(shot).size == (960, 1180)
    target = os.environ.get("QWENVL_SCREENSHOT")
    if target:
        shutil.copy(shot, target)


def test_markdown_renders_on_the_page(server, model, open_page, monkeypatch):
    answer = (
        "# Title\n\nSome *em* and _em_, ~~gone~~, a\nline break.\n\n1. first\n2. second\n   - nested\n\n"
        "> quoted\n\n| a | b |\n|---|--:|\n| 1 | 2 |\n\n---\n\n```python\nprint('hi')\n```\n\n"
        "![alt](https://example.com/x.png) 2 * 3 * 4 snake_case_name"
    )
    script_answer(monkeypatch, model.tokenizer, answer)
    page, guard = open_page(server)
    page.get_by_test_id("prompt").fill("Show me Markdown.")
    page.get_by_test_id("send").click()
    wait_for_answers(page, 1)
    shown = page.get_by_test_id("answer").locator(".markdown")
    assert shown.locator("h1").inner_text() == "Title"
    assert shown.locator("em").all_inner_texts() == ["em", "em"]
    assert shown.locator("del").inner_text() == "gone"
    assert shown.locator("p br").count() == 1
    assert shown.locator("ol > li").count() == 2 and shown.locator("ol ul li").inner_text() == "nested"
    assert shown.locator("blockquote").inner_text() == "quoted"
    assert shown.locator("th").all_inner_texts() == ["a", "b"] and shown.locator("td").all_inner_texts() == ["1", "2"]
    assert shown.locator("hr").count() == 1
    assert shown.locator(".code code.language-python").inner_text() == "print('hi')"
    assert "![alt](https://example.com/x.png) 2 * 3 * 4 snake_case_name" in shown.inner_text()
    assert shown.locator("img").count() == 0 and not any("example.com" in url for _, url in guard.requests)


def test_the_readme_screenshot_is_the_page():
    """README.md shows docs/chat-page.png, written by test_grounding_is_drawn_over_the_image (make screenshot)."""
    shot = Path(__file__).parent.parent / "docs" / "chat-page.png"
    assert "docs/chat-page.png" in (shot.parent.parent / "README.md").read_text()
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (960, 1180)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # not a blank page
