"""Mutated model files and a bounded CLI runner, for the hardening tests (test_hardening.py) and the fault
campaign (scripts/fault_campaign.py). No tests here.

Each mutation is (label, apply) where ``apply(directory_or_path)`` writes the mutated file in place.
``run_cli`` runs ``qwenvl.cli.main`` in this process with a deadline and reports its exit status, its
stderr, its time and any exception that escaped (a traceback for a user).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Mutation = tuple[str, Callable[[Path], None]]

# What the issue's probe put where a number belongs, and more of the same.
BAD_VALUES: list[Any] = [None, [96], {}, -1, 0, 1e12, 2**63, 2**31, "x", True, 1.5, -1e300, 1e300, 5e-324, [], "14"]

# The fields the probe broke (issue 23), as paths in a nested Qwen2-VL config.
ISSUE_CASES: list[tuple[str, Any]] = [
    ("vision_config.patch_size", None),
    ("vision_config.depth", [96]),
    ("text_config.vocab_size", {}),
    ("text_config.num_hidden_layers", None),
    ("text_config.rms_norm_eps", [96]),
    ("text_config.rope_parameters", True),
    ("vision_config.num_heads", -1),
    ("vision_config.patch_size", 1e12),
    ("vision_config.temporal_patch_size", 2**63),
    ("vision_config.depth", 2**63),
    ("text_config.vocab_size", 0),
    ("text_config.hidden_size", "x"),
    ("architectures", 5),
]


# ----------------------------------------------------------------------------------------------
# config.json


def leaf_paths(raw: Any, prefix: str = "") -> Iterator[str]:
    """Dotted paths of the config's scalar and list fields (nested objects walked)."""
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield path
            yield from leaf_paths(value, path + ".")
        else:
            yield path


def set_path(raw: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        raw = raw[part]
    raw[last] = value


def config_mutations(raw: dict, count: int | None, seed: int = 0) -> list[tuple[str, dict]]:
    """The issue's cases first, then (field, bad value) pairs: all of them, or ``count`` in all drawn
    with a fixed seed. Each: (label, mutated config)."""
    pairs = [(path, value) for path in leaf_paths(raw) for value in BAD_VALUES if path != "transformers_version"]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    chosen = ISSUE_CASES + pairs
    mutated, seen = [], set()
    for path, value in chosen:
        label = f"{path}={json.dumps(value)}"
        if label in seen:
            continue
        seen.add(label)
        config = json.loads(json.dumps(raw))
        try:
            set_path(config, path, value)
        except (KeyError, TypeError):
            continue
        mutated.append((label, config))
        if count is not None and len(mutated) == count:
            break
    return mutated


# ----------------------------------------------------------------------------------------------
# safetensors


def safetensors_mutations(data: bytes, count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``count`` mutated copies of a safetensors file: header entries edited (dtype, shape, offsets), the
    header's length changed, bytes flipped in the header or the data, the file truncated."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    names = [n for n in header if n != "__metadata__"]
    rng = random.Random(seed)
    out = []
    edits = [
        ("dtype", lambda e: None),
        ("dtype", lambda e: "F99"),
        ("dtype", lambda e: "I64"),
        ("dtype", lambda e: 7),
        ("shape", lambda e: None),
        ("shape", lambda e: [-1] + e["shape"][1:]),
        ("shape", lambda e: [2**40] + e["shape"][1:]),
        ("shape", lambda e: e["shape"][::-1]),
        ("shape", lambda e: e["shape"] + [1]),
        ("shape", lambda e: [e["shape"][0] + 1] + e["shape"][1:]),
        ("shape", lambda e: ["a"]),
        ("data_offsets", lambda e: [e["data_offsets"][1], e["data_offsets"][0]]),
        ("data_offsets", lambda e: [0, 2**62]),
        ("data_offsets", lambda e: None),
        ("data_offsets", lambda e: [-8, e["data_offsets"][1]]),
        ("entry", lambda e: None),
    ]
    for index in range(count):
        kind = index % 4
        if kind <= 1:  # edit one header entry
            name = rng.choice(names)
            key, edit = rng.choice(edits)
            copy = json.loads(json.dumps(header))
            if key == "entry":
                copy[name] = edit(copy[name])
            else:
                copy[name][key] = edit(copy[name])
            body = json.dumps(copy).encode()
            body += b" " * (-len(body) % 8)
            out.append((f"{name}.{key}", struct.pack("<Q", len(body)) + body + data[8 + length :]))
        elif kind == 2:  # the length field or bytes of the header
            blob = bytearray(data)
            if rng.random() < 0.4:
                blob[:8] = struct.pack("<Q", rng.choice([0, 1, length - 1, length + 1, 2**63, len(data), 2**40]))
                out.append(("header length", bytes(blob)))
            else:
                for _ in range(rng.randint(1, 8)):
                    blob[8 + rng.randrange(length)] = rng.randrange(256)
                out.append(("header bytes", bytes(blob)))
        else:  # truncation or data bytes
            if rng.random() < 0.5:
                out.append(("truncated", data[: rng.randrange(len(data))]))
            else:
                blob = bytearray(data)
                for _ in range(16):
                    blob[rng.randrange(8 + length, len(blob))] = rng.randrange(256)
                out.append(("data bytes", bytes(blob)))
    return out


# ----------------------------------------------------------------------------------------------
# GGUF


def gguf_mutations(path: Path, count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``count`` mutated copies of a GGUF file: metadata values set to extremes (in place, through the gguf
    package's reader), bytes flipped in the header / tensor infos or anywhere, the file truncated."""
    import gguf

    data = path.read_bytes()
    reader = gguf.GGUFReader(path)
    numeric = []  # (name, byte offset, numpy dtype) of scalar numeric metadata values
    for name, field in reader.fields.items():
        if len(field.types) == 1 and field.types[0] not in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY):
            part = field.parts[field.data[0]]
            offset = field.offset + sum(p.nbytes for p in field.parts[: field.data[0]])
            numeric.append((name, offset, part.dtype))
    header_end = min(len(data), reader.data_offset)
    rng = random.Random(seed)
    out = []
    for index in range(count):
        blob = bytearray(data)
        kind = index % 4
        if kind == 0 and numeric:
            name, offset, dtype = rng.choice(numeric)
            info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
            choices = [0, 1, -1, 2**31, 2**63] if info is None else [0, 1, info.max, info.min, info.max // 2]
            value = rng.choice(choices)
            if info is not None:
                value = max(min(value, info.max), info.min)
            blob[offset : offset + np.dtype(dtype).itemsize] = np.array(value).astype(dtype).tobytes()
            out.append((f"{name}={value}", bytes(blob)))
        elif kind == 1:
            for _ in range(rng.randint(1, 6)):
                blob[rng.randrange(header_end)] = rng.randrange(256)
            out.append(("header bytes", bytes(blob)))
        elif kind == 2:
            out.append(("truncated", data[: rng.randrange(len(data))]))
        else:
            for _ in range(rng.randint(1, 32)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
            out.append(("bytes", bytes(blob)))
    return out


# ----------------------------------------------------------------------------------------------
# Running the CLI with a deadline


@dataclass
class CliRun:
    argv: list[str]
    status: int | None  # None: it did not finish in time
    stderr: str
    seconds: float
    exception: str | None  # the traceback of an exception that escaped main()

    @property
    def hung(self) -> bool:
        return self.status is None and self.exception is None

    @property
    def traceback(self) -> bool:
        return self.exception is not None or "Traceback (most recent call last)" in self.stderr

    @property
    def clean(self) -> bool:
        """Exit 0, or exit 2 with one line on stderr; in time; no traceback."""
        if self.hung or self.traceback:
            return False
        if self.status == 0:
            return True
        errors = [line for line in self.stderr.splitlines() if line.strip()]
        return self.status == 2 and len(errors) == 1 and errors[0].startswith("qwenvl: error: ")


_CLI_LOCK = threading.Lock()


def run_cli(argv: list[str], timeout: float = 10.0) -> CliRun:
    """``qwenvl ARGV`` in this process (stdout dropped, stderr kept), given ``timeout`` seconds."""
    from qwenvl.cli import main

    result: dict[str, Any] = {}
    stderr = io.StringIO()

    def target() -> None:
        import traceback

        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
                result["status"] = main(argv)
        except SystemExit as exit_:
            result["status"] = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            result["exception"] = traceback.format_exc()

    with _CLI_LOCK:  # redirect_stderr is process-wide
        started = time.monotonic()
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(timeout)
        seconds = time.monotonic() - started
    return CliRun(argv, result.get("status"), stderr.getvalue(), seconds, result.get("exception"))
