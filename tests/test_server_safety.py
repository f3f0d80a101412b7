"""The server's error and safety rules: OpenAI-style 400 / 401 / 413 bodies, media fetch rules (allowed
domains, no private or loopback address even through a redirect, timeouts, size caps), local files
confined to the allowed path, and no crash or leaked request after any of it."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import threading
import time
from pathlib import Path

import pytest
import requests
from test_server_support import data_uri, live_server, png_bytes

import qwenvl
from qwenvl.server import fetch

KEY = "sekret-key"
IMAGE = png_bytes(56, 56, seed=5)
MAX_MEDIA = 64 * 1024


class MediaHandler(http.server.BaseHTTPRequestHandler):
    """/image.png, /big, /big-chunked, /slow, /redirect?to=URL; counts the requests it gets."""

    hits: list[str]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.path == "/image.png":
            self._send(IMAGE)
        elif self.path == "/big":
            self._send(b"\0" * (MAX_MEDIA + 1))
        elif self.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(4):
                self.wfile.write(b"%x\r\n%s\r\n" % (MAX_MEDIA // 2, b"\0" * (MAX_MEDIA // 2)))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/slow":
            time.sleep(3)
            self._send(IMAGE)
        elif self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server under test gave up (timeout, size cap): what the test wants

    def log_message(self, *args) -> None:
        pass


def media_host(address: str):
    hits: list[str] = []
    handler = type("Handler", (MediaHandler,), {"hits": hits})
    server = http.server.ThreadingHTTPServer((address, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hits


@pytest.fixture(scope="module")
def hosts():
    """A 'public' media host on 127.0.0.2 (treated as public by the tests) and a loopback one on 127.0.0.1."""
    public, public_hits = media_host("127.0.0.2")
    loopback, loopback_hits = media_host("127.0.0.1")
    yield {
        "public": f"http://127.0.0.2:{public.server_address[1]}",
        "public_hits": public_hits,
        "loopback": f"127.0.0.1:{loopback.server_address[1]}",
        "loopback_port": loopback.server_address[1],
        "loopback_hits": loopback_hits,
    }
    public.shutdown()
    loopback.shutdown()


@pytest.fixture
def public_127_0_0_2(monkeypatch):
    """Pretend 127.0.0.2 is a public address (a stand-in for an internet host); everything else is judged as is."""
    judge = fetch.is_public_address
    monkeypatch.setattr(fetch, "is_public_address", lambda ip: ip == "127.0.0.2" or judge(ip))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    (root / "allowed" / "inside.png").write_bytes(IMAGE)
    (root / "outside.png").write_bytes(IMAGE)
    (root / "allowed" / "escape.png").symlink_to(root / "outside.png")
    return root


@pytest.fixture(scope="module")
def model(make_vl):
    return qwenvl.load(make_vl("default"), dtype="float32", context=256)


@pytest.fixture(scope="module")
def server(model, media_dir):
    settings = dict(
        max_body_bytes=2**20,
        allowed_local_media_path=(media_dir / "allowed").resolve(),
        allowed_media_domains=("127.0.0.2", "127.0.0.1", "localhost"),
        mm_limits={"image": 2, "video": 1},
        media_timeout=1.0,
        max_media_bytes=MAX_MEDIA,
    )
    with live_server(model, max_batch=4, **settings) as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(model):
    with live_server(model, max_batch=2, api_key=KEY) as running:
        yield running


def post(server, body, path="/v1/chat/completions", **kwargs):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return requests.post(server.base_url + path, data=data, headers=headers, timeout=60, **kwargs)


def with_image(url: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}


def assert_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status in (400, 413) else "authentication_error")
    assert "\n" not in error["message"]
    for word in words:
        assert word in error["message"], error["message"]
    return error


# -- 400: the request itself ------------------------------------------------------------------------


def test_invalid_json_and_schema(server):
    assert_error(post(server, b'{"messages": [}'), 400, "invalid JSON")
    assert_error(post(server, b"[1, 2]"), 400)
    assert_error(post(server, {"max_tokens": 3}), 400, "messages")
    error = assert_error(post(server, {"messages": [{"role": "robot", "content": "hi"}]}), 400)
    assert error["param"] == "messages.0.role"
    cold = post(server, {"messages": [{"role": "user", "content": "x"}], "temperature": -1})
    assert assert_error(cold, 400)["param"] == "temperature"
    assert_error(post(server, b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}'), 400, "finite")
    assert_error(post(server, {"messages": [{"role": "user", "content": "x"}], "n": 17}), 400, "n=17")
    assert_error(post(server, {"messages": [{"role": "user", "content": "x"}], "audio": {"voice": "x"}}), 400, "audio")
    assert_error(post(server, {"prompt": ["a", "b"]}, "/v1/completions"), 400, "one prompt")
    assert_error(post(server, {"prompt": [1, 10**9]}, "/v1/completions"), 400, "vocabulary")
    assert_error(post(server, {"prompt": ""}, "/v1/completions"), 400)
    assert_error(
        post(server, {"prompt": "<|vision_start|><|image_pad|><|vision_end|>"}, "/v1/completions"), 400, "placeholder"
    )
    assert_error(post(server, {"messages": [{"role": "user", "content": "<|image_pad|>"}]}), 400, "placeholder")


def test_bad_media(server):
    assert_error(post(server, with_image("data:image/png;base64,@@not-base64@@")), 400, "base64")
    assert_error(post(server, with_image(data_uri(b"this is not an image"))), 400, "not an image")
    assert_error(post(server, with_image(data_uri(IMAGE[: len(IMAGE) // 2]))), 400)
    assert_error(post(server, with_image("ftp://example.com/x.png")), 400, "unsupported")
    assert_error(post(server, with_image("/etc/hostname")), 400, "unsupported")
    video = {"type": "video_url", "video_url": {"url": data_uri(b"\0" * 100, "video/mp4")}}
    assert_error(post(server, {"messages": [{"role": "user", "content": [video]}], "max_tokens": 2}), 400, "video")


def test_too_many_images_and_videos(server, hosts):
    part = {"type": "image_url", "image_url": {"url": data_uri(IMAGE)}}
    assert post(server, {"messages": [{"role": "user", "content": [part, part]}], "max_tokens": 1}).status_code == 200
    remote = {**part, "image_url": {"url": hosts["public"] + "/image.png"}}
    three = {"messages": [{"role": "user", "content": [part, part, remote]}]}
    before = len(hosts["public_hits"])
    assert_error(post(server, three), 400, "too many images", "at most 2")
    assert len(hosts["public_hits"]) == before  # refused before fetching anything
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    assert_error(post(server, {"messages": [{"role": "user", "content": [video, video]}]}), 400, "too many videos")


def test_prompt_longer_than_the_context_and_max_tokens_beyond_it(server):
    long_text = "hello " * 400
    assert_error(post(server, {"messages": [{"role": "user", "content": long_text}]}), 400, "context holds 256")
    assert_error(post(server, {"prompt": long_text}, "/v1/completions"), 400, "context holds 256")
    error = assert_error(
        post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 256}), 400, "beyond the context"
    )
    assert error["param"] == "max_tokens"
    assert post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).status_code == 200


# -- 401 / 413 ----------------------------------------------------------------------------------------


def test_api_key(keyed_server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_error(post(keyed_server, body), 401, "API key")
    assert_error(post(keyed_server, body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(post(keyed_server, b"{not json", headers={"Authorization": "Bearer wrong"}), 401)
    assert requests.get(keyed_server.base_url + "/v1/models", timeout=10).status_code == 401
    assert post(keyed_server, body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert requests.get(keyed_server.base_url + "/health", timeout=10).status_code == 200


def test_oversized_body(server):
    huge = with_image(data_uri(b"\0" * (2**20)))
    assert_error(post(server, huge), 413, "MiB limit")
    # no Content-Length (chunked upload): counted as it arrives
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunks = (json.dumps(huge)[i : i + 65536].encode() for i in range(0, 2**21, 65536))
    connection.request(
        "POST", "/v1/chat/completions", body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True
    )
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["message"].startswith("request body")
    connection.close()


# -- remote media -------------------------------------------------------------------------------------


def test_allowed_public_host_is_fetched(server, hosts, public_127_0_0_2):
    assert post(server, with_image(hosts["public"] + "/image.png")).status_code == 200
    assert "/image.png" in hosts["public_hits"]


def test_domain_not_allowed(server):
    assert_error(post(server, with_image("http://example.invalid/cat.png")), 400, "not allowed")
    assert_error(post(server, with_image("https://127.0.0.3/cat.png")), 400, "not allowed")


def test_loopback_refused_even_when_its_name_is_allowed(server, hosts):
    before = len(hosts["loopback_hits"])
    for host in ("localhost", "127.0.0.1"):
        url = f"http://{host}:{hosts['loopback_port']}/image.png"
        assert_error(post(server, with_image(url)), 400, "private or local address")
    assert len(hosts["loopback_hits"]) == before


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost"])
def test_redirect_to_loopback_is_refused(server, hosts, public_127_0_0_2, target):
    loopback_before, public_before = len(hosts["loopback_hits"]), len(hosts["public_hits"])
    target_url = f"http://{target}:{hosts['loopback_port']}/image.png"
    assert_error(post(server, with_image(f"{hosts['public']}/redirect?to={target_url}")), 400, "private or local")
    assert len(hosts["public_hits"]) == public_before + 1  # the first hop was fetched
    assert len(hosts["loopback_hits"]) == loopback_before  # the redirect target never was
    # a redirect to an allowed public host is followed
    good = f"{hosts['public']}/redirect?to={hosts['public']}/image.png"
    assert post(server, with_image(good)).status_code == 200


def test_redirect_to_a_domain_not_allowed(server, hosts, public_127_0_0_2):
    url = f"{hosts['public']}/redirect?to=http://example.invalid/x.png"
    assert_error(post(server, with_image(url)), 400, "example.invalid is not allowed")


def test_fetch_timeout_and_size_caps(server, hosts, public_127_0_0_2):
    started = time.monotonic()
    assert_error(post(server, with_image(hosts["public"] + "/slow")), 400, "timed out")
    assert time.monotonic() - started < 2.5
    assert_error(post(server, with_image(hosts["public"] + "/big")), 400, "byte limit")
    assert_error(post(server, with_image(hosts["public"] + "/big-chunked")), 400, "byte limit")
    assert_error(post(server, with_image(data_uri(b"\0" * (MAX_MEDIA + 10)))), 400, "byte limit")


# -- local files --------------------------------------------------------------------------------------


def test_local_files_only_under_the_allowed_path(server, media_dir):
    allowed = media_dir / "allowed"
    assert post(server, with_image((allowed / "inside.png").as_uri())).status_code == 200
    assert_error(post(server, with_image((media_dir / "outside.png").as_uri())), 400, "outside the allowed")
    assert_error(post(server, with_image((allowed / "escape.png").as_uri())), 400, "outside the allowed")
    assert_error(post(server, with_image(f"file://{allowed}/../outside.png")), 400, "outside the allowed")
    assert_error(post(server, with_image((allowed / "missing.png").as_uri())), 400, "no such file")
    assert_error(post(server, with_image("file://otherhost/etc/passwd")), 400, "local file")
    assert_error(post(server, with_image("file:///etc/passwd")), 400, "outside the allowed")


def test_local_files_refused_without_an_allowed_path(keyed_server, media_dir):
    body = with_image((media_dir / "allowed" / "inside.png").as_uri())
    response = post(keyed_server, body, headers={"Authorization": f"Bearer {KEY}"})
    assert_error(response, 400, "local files are disabled")


def test_data_uri_decodes_to_the_exact_bytes():
    from qwenvl.server.settings import ServerSettings

    fetcher = fetch.MediaFetcher(ServerSettings(model_id="x"))
    assert fetcher.fetch("data:image/png;base64," + base64.b64encode(IMAGE).decode()) == IMAGE


def test_public_address_rules():
    for address in (
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "172.16.5.4",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "fc00::1",
        "0.0.0.0",
        "100.64.0.1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
    ):
        assert not fetch.is_public_address(address), address
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert fetch.is_public_address(address), address


def test_no_leak_and_still_serving_after_bad_input(server):
    """Runs last in this module: nothing is left running, and a good request still works."""
    health = requests.get(server.base_url + "/health", timeout=10).json()
    assert health["running"] == 0 and health["waiting"] == 0
    response = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
