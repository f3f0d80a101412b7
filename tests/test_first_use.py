"""The first minutes of a new user (issue 21): status lines on terminals, errors that say what to do,
the port checked before loading, consistent commands, no local paths in server errors."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from gguf_vl_fixtures import VL_CONFIGS, write_test_image

import qwenvl
from qwenvl import status
from qwenvl.cli import main as cli_main
from qwenvl.convert import convert_hf
from qwenvl.errors import MediaError, QwenVLError

QWENVL = [sys.executable, "-m", "qwenvl"]
ENV = {**os.environ, "QWENVL_API_KEY": "", "COLUMNS": "120"}


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*QWENVL, *args], input=stdin, capture_output=True, text=True, env=ENV, timeout=timeout)


def run_with_tty_stderr(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    """The command with stderr on a pseudo-terminal (what a user at a terminal sees) and stdout piped."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a terminal's size
    process = subprocess.Popen(
        [*QWENVL, *args], stdout=subprocess.PIPE, stderr=terminal, stdin=subprocess.DEVNULL, env=ENV
    )
    os.close(terminal)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(controller, 4096)
            except OSError:  # the terminal closed: the process ended
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out, _ = process.communicate(timeout=timeout)
    reader.join(timeout=10)
    os.close(controller)
    return process.returncode, out.decode(), b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


@pytest.fixture(scope="module")
def text_dir(make_qwen2):
    return make_qwen2("default")


@pytest.fixture(scope="module")
def vl_gguf(make_vl, tmp_path_factory):
    """A tiny Qwen2-VL converted to GGUF: (text GGUF, mmproj GGUF), side by side in one folder."""
    hf_dir = make_vl("qwen2_vl-d2", **VL_CONFIGS["qwen2_vl-d2"])
    text, mmproj = convert_hf(hf_dir, tmp_path_factory.mktemp("vl-gguf"), out_type="f32", progress=False)
    return text.path, mmproj.path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    return write_test_image(tmp_path_factory.mktemp("img") / "cat.png", 64, 48, seed=1)


# ---------------------------------------------------------------------------------------------------
# 1. status lines: on a terminal only, never with --json


def test_status_lines_on_a_terminal(text_dir):
    long_prompt = "word " * 600
    code, out, err = run_with_tty_stderr("run", str(text_dir), "-p", long_prompt, "-n", "2", "--dtype", "float32")
    assert code == 0, err
    assert f"qwenvl: loading {text_dir.name} … done (" in err
    assert "qwenvl: prefill of " in err and " prompt tokens … done (" in err
    assert "qwenvl:" not in out


def test_no_status_lines_with_json_or_without_a_terminal(text_dir):
    code, out, err = run_with_tty_stderr("run", str(text_dir), "-p", "hi", "-n", "2", "--dtype", "float32", "--json")
    assert code == 0, err
    assert json.loads(out)["completion_tokens"] >= 1
    assert "qwenvl: loading" not in err and err.strip() == ""
    piped = run_cli("run", str(text_dir), "-p", "hi", "-n", "2", "--dtype", "float32")
    assert piped.returncode == 0 and "loading" not in piped.stderr


def test_status_steps_nest_and_stay_quiet_when_off(capsys):
    with status.step("outer"):
        with status.step("inner"):
            pass
    assert capsys.readouterr().err == ""
    status.configure(True)
    try:
        with status.step("loading x"):
            with status.step("building the kernels"):
                pass
        err = capsys.readouterr().err
    finally:
        status.configure(False)
    lines = err.splitlines()
    assert lines[0] == "qwenvl: loading x … "
    assert lines[1].startswith("qwenvl: building the kernels … done (")
    assert lines[2].startswith("qwenvl: loading x … done (")


def test_kernel_build_says_so_once(monkeypatch, tmp_path, capsys):
    from qwenvl.ops import build, isa

    built = []
    monkeypatch.setattr(build, "cache_root", lambda: tmp_path)
    monkeypatch.setattr(build, "_build", lambda cxx, flags, sources, target: built.append(target))
    status.configure(True)
    try:
        target = build.build_library(isa.ISAS["scalar"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")  # now cached: no second build, no second line
        build.build_library(isa.ISAS["scalar"])
    finally:
        status.configure(False)
    err = capsys.readouterr().err
    assert len(built) == 1 and err.count("building the native kernels for scalar (once") == 1


def test_default_model_assembly_shows_progress(monkeypatch, tmp_path, capsys):
    from gguf.constants import GGUF_MAGIC

    from qwenvl import defaults

    parts = []
    payload = GGUF_MAGIC.to_bytes(4, "little") + bytes(3000)
    for number, start in enumerate(range(0, len(payload), 1000), start=1):
        part = tmp_path / f"part{number:02d}.bin"
        part.write_bytes(payload[start : start + 1000])
        parts.append(part)
    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(defaults, "_part_files", lambda: parts)
    monkeypatch.setattr(defaults, "DEFAULT_GGUF_SIZE", len(payload))
    status.configure(True)
    try:
        path = defaults.default_gguf_path()
    finally:
        status.configure(False)
    assert path.read_bytes() == payload
    err = capsys.readouterr().err
    assert "qwenvl: assembling the default model" in err and "qwenvl: default model: 100%" in err


# ---------------------------------------------------------------------------------------------------
# 2. a Qwen2-VL GGUF without its mmproj


def test_vl_gguf_finds_its_mmproj_beside_it(vl_gguf, image, capsys):
    text, mmproj = vl_gguf
    model = qwenvl.load(text, dtype="float32")
    assert model.vision_model is not None
    err = capsys.readouterr().err
    assert f"using the vision projector {mmproj.name} found beside the model" in err
    result = model.chat(
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}], max_tokens=2
    )
    assert result.completion_tokens >= 1


def test_vl_gguf_alone_says_where_the_vision_half_is(vl_gguf, image, tmp_path):
    text, mmproj = vl_gguf
    alone = tmp_path / text.name
    shutil.copy(text, alone)
    model = qwenvl.load(alone, dtype="float32")
    assert model.vision_model is None
    with pytest.raises(MediaError, match=r"a Qwen2-VL model whose vision half is in another file: .*--mmproj FILE"):
        model.chat(
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}],
            max_tokens=2,
        )
    out = run_cli("run", str(alone), "--image", image, "-p", "hi", "-n", "2")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--mmproj FILE" in out.stderr
    # two projectors that fit: none is guessed
    shutil.copy(mmproj, tmp_path / "mmproj-a.gguf")
    shutil.copy(mmproj, tmp_path / "mmproj-b.gguf")
    assert qwenvl.load(alone, dtype="float32").vision_model is None


# ---------------------------------------------------------------------------------------------------
# 3. a port in use: one line, exit 2, before loading


def test_serve_on_a_port_in_use_fails_before_loading(text_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        out = run_cli("serve", str(text_dir), "--port", str(port), timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"qwenvl: error: cannot listen on 127.0.0.1:{port}: ")
    assert out.stderr.count("\n") == 1 and "--port" in out.stderr
    assert "loaded" not in out.stderr and time.monotonic() - started < 30


def test_serve_ray_checks_the_port_before_starting_ray(text_dir, monkeypatch, capsys):
    import qwenvl.deploy

    monkeypatch.setattr(qwenvl.deploy, "serve_on_ray", lambda *a: pytest.fail("Ray started on a port in use"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert cli_main(["serve", str(text_dir), "--ray", "--port", port]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qwenvl: error: cannot listen on 127.0.0.1:{port}: ") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------
# 5. /docs offline


def test_docs_page_assets_are_served_locally(text_dir):
    from qwenvl.server import ServerSettings, create_app

    model = qwenvl.load(text_dir, dtype="float32")
    app = create_app(model, ServerSettings(model_id="tiny", ui=False))
    with TestClient(app) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assert "cdn" not in page.text.lower()
        scripts = [part.split('"')[0] for part in page.text.split('src="')[1:]]
        styles = [part.split('"')[0] for part in page.text.split('href="')[1:] if ".css" in part.split('"')[0]]
        assert scripts and styles
        for url in scripts + styles:
            assert url.startswith("/"), url
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 10_000, url
        redoc = client.get("/redoc")
        assert redoc.status_code == 200 and "cdn" not in redoc.text.lower()


# ---------------------------------------------------------------------------------------------------
# 6. chat: /image and /video checked when typed


def test_chat_checks_attachments_when_typed(text_dir, make_vl, tmp_path):
    out = run_cli("chat", str(text_dir), stdin="/image cat.png\n/quit\n")
    assert out.returncode == 0 and "is a text-only model" in out.stderr
    assert "attached" not in out.stderr
    vl_dir = make_vl("default")
    missing = tmp_path / "missing.png"
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    stdin = f"/image {missing}\n/video {tmp_path / 'missing.mp4'}\n/image {not_image}\n/quit\n"
    out = run_cli("chat", str(vl_dir), "--dtype", "float32", stdin=stdin)
    assert out.returncode == 0, out.stderr
    assert f"image file not found: {missing}" in out.stderr
    assert "video file not found" in out.stderr
    assert "notes.png" in out.stderr and "attached" not in out.stderr


# ---------------------------------------------------------------------------------------------------
# 7. what is not a model


def test_not_a_model_is_said_in_one_line(tmp_path):
    (tmp_path / "odd.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16))
    (tmp_path / "folder").mkdir()
    for target in (tmp_path / "odd.png", tmp_path / "folder"):
        out = run_cli("run", str(target), "-p", "hi")
        assert out.returncode == 2 and out.stderr.count("\n") == 1
        assert (
            "not a model: expected a checkpoint directory (config.json + weights), a .gguf file or a hub id"
            in out.stderr
        )


# ---------------------------------------------------------------------------------------------------
# 8. consistent commands


def test_tokenize_dash_reads_stdin(text_dir):
    out = run_cli("tokenize", str(text_dir), "-", "--json", stdin="Hello world")
    assert out.returncode == 0, out.stderr
    direct = run_cli("tokenize", str(text_dir), "Hello world", "--json")
    assert json.loads(out.stdout) == json.loads(direct.stdout) and json.loads(out.stdout)["ids"]


def test_info_without_a_model_describes_the_embedded_one(monkeypatch, capsys, text_dir):
    from qwenvl import defaults

    monkeypatch.setattr(defaults, "default_model_path", lambda: text_dir)
    assert cli_main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"].endswith(text_dir.name)
    assert info["threading"]["omp_wait_policy"] == os.environ["OMP_WAIT_POLICY"]
    assert cli_main(["info"]) == 0
    text = capsys.readouterr().out
    assert "OpenMP wait policy" in text and "OMP_WAIT_POLICY=ACTIVE|PASSIVE" in text and "--threads N" in text


def test_interrupted_convert_leaves_no_folder_it_created(monkeypatch, text_dir, tmp_path):
    from qwenvl import convert

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "write_gguf", interrupted)
    out_dir = tmp_path / "new" / "gguf"
    with pytest.raises(KeyboardInterrupt):
        convert.convert_hf(text_dir, out_dir, out_type="f32", progress=False)
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(KeyboardInterrupt):
        convert.convert_hf(text_dir, kept, out_type="f32", progress=False)
    assert kept.is_dir()  # the user's folder stays


def test_interrupted_export_leaves_no_folder_it_created(monkeypatch, text_dir, tmp_path):
    from qwenvl.weights import export

    (gguf,) = convert_hf(text_dir, tmp_path / "gguf", out_type="f32", progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_write_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export_hf(gguf.path, tmp_path / "new" / "deeper" / "hf")
    assert not (tmp_path / "new").exists()


def test_export_prints_what_it_wrote(text_dir, tmp_path):
    (gguf,) = convert_hf(text_dir, tmp_path / "gguf", out_type="f32", progress=False)
    out = run_cli("export", str(gguf.path), "-o", str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith(str(tmp_path / "hf" / "model.safetensors") + "  ") for line in lines)
    assert any(line.startswith(str(tmp_path / "hf" / "config.json") + "  ") for line in lines)
    assert lines[-1].endswith(f"MB in {tmp_path / 'hf'}") and "files" in lines[-1]


def test_min_pixels_above_max_pixels_is_refused(text_dir):
    out = run_cli("run", str(text_dir), "-p", "hi", "--min-pixels", "5000", "--max-pixels", "4000")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "--min-pixels 5000 is above --max-pixels 4000" in out.stderr
    from qwenvl.media.image import check_pixel_range

    with pytest.raises(QwenVLError, match="min_pixels"):
        check_pixel_range(5000, 4000)


# ---------------------------------------------------------------------------------------------------
# 9. no local paths in server errors


def test_server_errors_name_the_model_not_its_path(text_dir, image, caplog):
    from qwenvl.server import ServerSettings, create_app

    model = qwenvl.load(text_dir, dtype="float32")
    app = create_app(model, ServerSettings(model_id="tiny-model", ui=False))
    body = {
        "model": "tiny-model",
        "max_tokens": 2,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(image)}}]}],
    }
    with TestClient(app) as client, caplog.at_level("INFO", logger="qwenvl.server"):
        answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert "tiny-model is a text-only model" in message
    assert str(text_dir) not in message and str(Path.home()) not in message and "/tmp" not in message
    assert str(text_dir) in caplog.text  # the path stays in the server's log


def test_path_redactor_names_the_model_and_hides_folders(tmp_path):
    from qwenvl.defaults import cache_dir
    from qwenvl.server.errors import path_redactor

    source = tmp_path / "models" / "m.gguf"
    redact = path_redactor(str(source), "m")
    assert redact(f"{source}: broken") == "m: broken"
    assert redact(f"{source.parent / 'mmproj.gguf'} missing") == "<model folder>/mmproj.gguf missing"
    assert redact(f"{cache_dir() / 'x'}") == "<cache>/x"
    assert redact(f"{Path.home() / 'pictures'}") == "~/pictures"
    assert redact("file:///srv/cat.png: no such file") == "file:///srv/cat.png: no such file"
    url = f"file://{source.parent / 'cat.png'}: outside the allowed local media path"
    assert redact(url) == url  # the client's own URL is not rewritten


def _data_uri(path: str) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
