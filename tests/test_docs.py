"""The docs' examples run: every ```bash and ```python block of README.md and docs/*.md, against a live
tiny server and tiny checkpoints (issue 21).

Untagged blocks (synopses, outputs) are not run. A block that cannot run here says so on the line
before its fence: ``<!-- docs-test: skip REASON -->`` (skipped with the reason: a real hub model,
Ray, the whole test suite) or ``<!-- docs-test: slow REASON -->`` (run with ``-m slow`` only). Before
running, hub ids and model folders of the examples become the tiny Qwen2-VL checkpoint, the server's
address the test server's, and ``/home/me/pictures`` the folder holding cat.png, cat.jpg and clip.mp4.
The Python blocks of one page run in order in one process (a block may use what an earlier one made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from docs_sampler import closing_sampler, closing_tokens
from PIL import Image
from test_server_support import live_server

import qwenvl

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(skip|slow)\b\s*(.*?)\s*-->$")
HUB_MODELS = re.compile(r"(?:\./)?(?:Qwen/)?Qwen2(?:\.5)?-VL-\d+B-Instruct")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    mark: str | None = None  # "skip" / "slow"
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced ```bash / ```python blocks of a page, with the marker on the line before each."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        if match.group(1) in ("bash", "python"):
            block = Block(page, index + 1, match.group(1), "\n".join(lines[index + 1 : end]) + "\n")
            marker = MARKER.match(lines[index - 1].strip()) if index else None
            if marker:
                block.mark, block.reason = marker.group(1), marker.group(2)
            found.append(block)
        index = end + 1
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def test_every_marker_belongs_to_a_block():
    """A marker not right above a bash / python fence would silently mark nothing."""
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if MARKER.match(line.strip()):
                following = lines[number + 1] if number + 1 < len(lines) else ""
                assert following in ("```bash", "```python"), f"{page.name}:{number + 1}: marker without a block"


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    """cat.png (large enough that its base64 would not fit a command line), cat.jpg, a.png, b.png, clip.mp4."""
    import av

    folder = tmp_path_factory.mktemp("docs-media")
    noise = np.random.default_rng(0).integers(0, 256, (260, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "cat.png")  # ~230 KB
    Image.fromarray(noise).save(folder / "cat.jpg")
    for name in ("a.png", "b.png"):
        Image.fromarray(noise[:64, :64]).save(folder / name)
    with av.open(str(folder / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for index in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), index * 30, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return folder


@pytest.fixture(scope="module")
def vl_dir(make_vl, tmp_path_factory):
    """The tiny Qwen2-VL with Qwen2.5's tool template in tokenizer_config.json, as Qwen2.5-VL ships it."""
    directory = tmp_path_factory.mktemp("docs-model") / "Qwen2-VL-tiny"
    shutil.copytree(make_vl("default"), directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (Path(__file__).parent / "data" / "qwen2_5_chat_template.jinja").read_text()
    config_path.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def closing(vl_dir) -> list[int]:
    """The tokens the docs_sampler prefers under a grammar (tests/docs_sampler.py)."""
    from qwenvl.tokenizer import Tokenizer

    return closing_tokens(Tokenizer.from_dir(vl_dir), eos=151645)


@pytest.fixture(scope="module")
def docs_server(vl_dir, media_dir, closing):
    import qwenvl.engine.generate as generate

    model = qwenvl.load(vl_dir, dtype="float32")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generate, "Sampler", closing_sampler(generate.Sampler, closing))
        with live_server(model, max_batch=4, model_id="qwen", allowed_local_media_path=media_dir.resolve()) as server:
            yield server


def localized(code: str, server, vl_dir: Path, media_dir: Path) -> str:
    """The example as it runs here: the tiny model, the test server, the media folder."""
    code = HUB_MODELS.sub(str(vl_dir), code)
    code = code.replace("http://127.0.0.1:8000", server.base_url)
    return code.replace("/home/me/pictures", str(media_dir)).replace("~/pictures", str(media_dir))


def _runnable(block: Block, request) -> None:
    if block.mark == "skip":
        pytest.skip(f"{block.name}: {block.reason}")
    selected = request.config.getoption("-m") or ""
    if block.mark == "slow" and ("slow" not in selected or "not slow" in selected):
        pytest.skip(f"{block.name}: slow ({block.reason}); run with -m slow")


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "QWENVL_API_KEY": ""}


BASH_BLOCKS = [block for block in ALL_BLOCKS if block.language == "bash"]


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=[block.name for block in BASH_BLOCKS])
def test_shell_block_runs(block, request, docs_server, vl_dir, media_dir, tmp_path):
    _runnable(block, request)
    if shutil.which("curl") is None and "curl " in block.code:
        pytest.skip("curl is not installed")
    for file in media_dir.iterdir():
        shutil.copy(file, tmp_path / file.name)
    code = localized(block.code, docs_server, vl_dir, media_dir)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300
    )
    assert done.returncode == 0, f"{block.name} failed:\n{done.stderr[-2000:]}"
    assert '"error"' not in done.stdout, f"{block.name} answered an error:\n{done.stdout[-2000:]}"


PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.language == "python"]


def test_python_blocks_run(request, docs_server, vl_dir, media_dir, closing, tmp_path):
    """Every page's Python blocks in order, each page in its own namespace, all in one interpreter (one
    torch import); a failure names its block."""
    runnable, skipped = [], []
    for block in PYTHON_BLOCKS:
        try:
            _runnable(block, request)
            runnable.append(block)
        except pytest.skip.Exception as reason:
            skipped.append(str(reason))
    for file in media_dir.iterdir():
        shutil.copy(file, tmp_path / file.name)
    tests_dir = str(Path(__file__).parent)
    script = [
        "import sys, traceback",
        f"sys.path.insert(0, {tests_dir!r})",
        f"import docs_sampler; docs_sampler.install({closing!r})",
        "namespaces = {}",
    ]
    for block in runnable:
        code = localized(block.code, docs_server, vl_dir, media_dir)
        page = str(block.page.relative_to(ROOT))
        script += [
            "try:",
            f"    exec(compile({code!r}, {block.name!r}, 'exec'), namespaces.setdefault({page!r}, {{'__name__': '__main__'}}))",
            "except BaseException:",
            f"    print('block {block.name} failed', file=sys.stderr)",
            "    traceback.print_exc()",
            "    sys.exit(1)",
            f"print('ran {block.name}', file=sys.stderr)",
        ]
    done = subprocess.run(
        [sys.executable, "-c", "\n".join(script)], cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ran = [line.removeprefix("ran ") for line in done.stderr.splitlines() if line.startswith("ran ")]
    assert ran == [block.name for block in runnable]
    if skipped:
        print("skipped:", "; ".join(skipped))
