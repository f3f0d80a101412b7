"""Helpers for the server tests (no tests here): a live uvicorn server in a thread, test media, SSE parsing."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import uvicorn
from PIL import Image


def live_server(model: Any, *, max_batch: int = 8, model_id: str = "tiny", **settings: Any) -> LiveServer:
    """A LiveServer over ``model`` with a new BatchEngine and these ServerSettings."""
    from qwenvl.server import ServerSettings, create_app

    return LiveServer(create_app(model, ServerSettings(model_id=model_id, **settings), max_batch=max_batch))


class LiveServer:
    """``with LiveServer(app) as server:`` serves ``app`` on a free 127.0.0.1 port until the block ends."""

    def __init__(self, app: Any):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        from qwenvl.server import server_config

        self.server = uvicorn.Server(server_config(app, log_level="warning"))  # the settings' connection limits
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def png_bytes(width: int = 56, height: int = 56, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def video_file(path: Path, frames: int = 4, size: int = 56, fps: int = 2) -> Path:
    """A tiny mpeg4 clip of moving noise."""
    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height = stream.width = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def sse_payloads(text: str) -> list[Any]:
    """The JSON payloads of an SSE body, and "[DONE]" where it comes."""
    payloads = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads
