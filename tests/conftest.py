"""Shared fixtures: the real Qwen2 tokenizer and tiny random checkpoints built with transformers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as qwenvl sets it (qwenvl/__init__.py)
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import build_llama, build_qwen2, build_qwen_v1, build_vl  # noqa: E402
from isa_paths import ISAS, kernels  # noqa: E402
from spm_fixtures import train_sentencepiece  # noqa: E402
from tokenizer_fixtures import qwen_tokenizer_dir  # noqa: E402

from qwenvl import ops  # noqa: E402

# Under pytest-xdist (`make test` runs two workers) the cores are shared out between the workers.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return qwen_tokenizer_dir(tmp_path_factory.mktemp("qwen-tokenizer"))


@pytest.fixture(scope="session")
def make_qwen2(tmp_path_factory, tokenizer_dir):
    """make_qwen2(name, **shape) → a cached tiny Qwen2 checkpoint directory."""
    made: dict[str, Path] = {}

    def make(name: str = "default", **shape) -> Path:
        if name not in made:
            made[name] = build_qwen2(tmp_path_factory.mktemp(f"qwen2-{name}"), tokenizer_dir, **shape)
        return made[name]

    return make


@pytest.fixture(scope="session")
def make_vl(tmp_path_factory, tokenizer_dir):
    """make_vl(name, arch=..., **shape) → a cached tiny Qwen2-VL / Qwen2.5-VL checkpoint directory."""
    made: dict[str, Path] = {}

    def make(name: str = "default", **options) -> Path:
        if name not in made:
            made[name] = build_vl(tmp_path_factory.mktemp(f"vl-{name}"), tokenizer_dir, **options)
        return made[name]

    return make


@pytest.fixture(scope="session")
def make_qwen_v1(tmp_path_factory):
    """make_qwen_v1(name, **shape) → a cached tiny Qwen (v1) checkpoint directory (QWenLMHeadModel)."""
    made: dict[str, Path] = {}

    def make(name: str = "default", **shape) -> Path:
        if name not in made:
            made[name] = build_qwen_v1(tmp_path_factory.mktemp(f"qwen-v1-{name}"), **shape)
        return made[name]

    return make


@pytest.fixture(scope="session")
def spm_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny SentencePiece models trained with Llama's settings: {"bpe": path, "unigram": path}."""
    root = tmp_path_factory.mktemp("spm")
    return {kind: train_sentencepiece(root / kind, kind) for kind in ("bpe", "unigram")}


@pytest.fixture(scope="session")
def make_llama(tmp_path_factory, spm_models):
    """make_llama(name, **shape) → a cached tiny Llama checkpoint directory (BPE tokenizer.model)."""
    made: dict[str, Path] = {}

    def make(name: str = "default", **options) -> Path:
        if name not in made:
            made[name] = build_llama(tmp_path_factory.mktemp(f"llama-{name}"), spm_models["bpe"], **options)
        return made[name]

    return make


@pytest.fixture(params=ISAS)
def native_isa(request, monkeypatch):
    """Each ISA path in turn as the process's choice (QWENVL_ISA): its kernels, or the test is skipped
    with the reason this machine cannot run it. The choice is undone after the test."""
    chosen = kernels(request.param)
    monkeypatch.setenv("QWENVL_ISA", request.param)
    monkeypatch.delenv("QWENVL_KERNELS", raising=False)
    ops.kernels.cache_clear()
    yield chosen
    ops.kernels.cache_clear()
