"""Llama checkpoints with SentencePiece tokenizers (seed 004): the tokenizer against transformers'
(use_fast=False, sentencepiece installed) and sentencepiece itself, the model against transformers'
LlamaForCausalLM (GQA, tied and untied heads, rope bases), base models without a chat template
refused for chat and run raw, and bad tokenizer files refused in one line.
"""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import sentencepiece
import torch
from checkpoints import write_meta
from gguf.constants import TokenType
from safetensors.torch import load_file
from spm_fixtures import LLAMA_TOKENIZER_CONFIG, write_tokenizer_files
from transformers import AutoTokenizer, LlamaForCausalLM

import qwenvl
from qwenvl.cli import main as cli_main
from qwenvl.convert import convert_hf
from qwenvl.errors import ModelFileError, RequestError
from qwenvl.info import model_info
from qwenvl.tokenizer import Tokenizer
from qwenvl.weights.gguf import open_gguf_file, read_gguf
from qwenvl.weights.layout import permute_rows
from qwenvl.weights.meta import load_meta

TEXTS = [
    "hello world",
    "the quick brown fox jumps over a lazy dog",
    " leading space and  two spaces",
    "describe the <image> picture <image>please",
    "héllo 你好 世界 x\n\ny\ttab",
    "Mr. Smith's café, 3.14! 12345",
    "<s>the</s> fox",
    "emoji 🦙 and unknown ∰ chars",
    "",
]
LLAMA_SHAPES = {
    "gqa": dict(heads=4, kv_heads=2),
    "tied-theta5e5": dict(heads=4, kv_heads=1, tie=True, theta=500000.0),
}


def reference_greedy(directory, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            sequence.append(int(hf(torch.tensor([sequence])).logits[0, -1].argmax()))
        return sequence[len(ids) :], hf(torch.tensor([sequence])).logits[0]


def our_logits(model, ids: list[int]) -> torch.Tensor:
    text = model.text_model
    with torch.inference_mode():
        positions = torch.arange(len(ids))[None, None, :].expand(3, 1, -1)
        return text.logits(text(text.embed(torch.tensor([ids])), positions))[0]


def greedy(model, prompt, steps: int = 24) -> list[int]:
    generation = model.generate(prompt, temperature=0, max_tokens=steps, ignore_eos=True)
    for _ in generation:
        pass
    return generation.result.token_ids


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_matches_transformers(make_llama):
    directory = make_llama("gqa", **LLAMA_SHAPES["gqa"])
    theirs = AutoTokenizer.from_pretrained(directory, use_fast=False)
    ours = Tokenizer.from_dir(directory)
    assert (ours.add_bos_token, ours.add_eos_token) == (True, False)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token) == (1, 2, "<unk>")
    image = ours.token_to_id("<image>")
    assert image == theirs.convert_tokens_to_ids("<image>") == ours.vocab_size - 1
    for text in TEXTS:
        expected = theirs.encode(text)
        assert ours.encode_raw(text) == expected, text
        assert ours.decode(expected) == theirs.decode(expected), text
    assert ours.encode("a <image> b").count(image) == 1  # kept whole


@pytest.mark.parametrize(
    "config_changes, extra",
    [
        ({"legacy": True}, {}),
        ({"add_eos_token": True, "add_bos_token": False}, {}),
        ({"add_prefix_space": False}, {}),
        ({"added_tokens_decoder": {"600": {"content": "<image>", "special": True, "normalized": False}}}, {}),
        ({}, {"special_tokens_map": {"eos_token": "<image>", "pad_token": "</s>"}, "added_tokens": {"<image>": 600}}),
    ],
)
def test_tokenizer_config_read_as_transformers_reads_it(spm_models, tmp_path, config_changes, extra):
    directory = write_tokenizer_files(
        tmp_path / "tok", spm_models["bpe"], LLAMA_TOKENIZER_CONFIG | config_changes, **extra
    )
    theirs = AutoTokenizer.from_pretrained(directory, use_fast=False)
    ours = Tokenizer.from_dir(directory)
    assert (ours.eos_token, ours.pad_token) == (theirs.eos_token, theirs.pad_token)
    for text in TEXTS:
        assert ours.encode_raw(text) == theirs.encode(text), text


def test_unigram_model_segments_as_sentencepiece(spm_models, tmp_path):
    """transformers 5 turns a unigram model into BPE merges by piece id (another segmentation); the
    model was trained with sentencepiece's, which qwenvl keeps."""
    directory = write_tokenizer_files(tmp_path / "uni", spm_models["unigram"])
    ours = Tokenizer.from_dir(directory)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_models["unigram"]))
    for text in TEXTS:
        if text.strip() and "<" not in text and not text.startswith(" "):
            assert ours.encode(text) == processor.encode(text), text


@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model at all", b"\x0a\x03abc"])
def test_bad_tokenizer_model_is_one_line(spm_models, tmp_path, content):
    directory = write_tokenizer_files(tmp_path / "bad", spm_models["bpe"])
    (directory / "tokenizer.model").write_bytes(content)
    with pytest.raises(ModelFileError, match="not a SentencePiece model") as error:
        Tokenizer.from_dir(directory)
    assert str(directory / "tokenizer.model") in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("name", LLAMA_SHAPES)
def test_greedy_ids_and_logits_match_transformers(make_llama, name):
    directory = make_llama(name, **LLAMA_SHAPES[name])
    model = qwenvl.load(directory, dtype="float32")
    assert model.config.arch == "llama" and model.chat_template is None
    prompt = model.prepare_raw("describe the <image> picture, the quick brown fox")
    tokens = AutoTokenizer.from_pretrained(directory, use_fast=False).encode(
        "describe the <image> picture, the quick brown fox"
    )
    assert prompt.input_ids == tokens
    expected, hf_logits = reference_greedy(directory, tokens, 24)
    assert greedy(model, prompt) == expected
    assert (our_logits(model, tokens + expected) - hf_logits).abs().max() <= 1e-4


def test_base_model_refuses_chat_and_runs_raw(make_llama, capsys):
    directory = make_llama("gqa", **LLAMA_SHAPES["gqa"])
    model = qwenvl.load(directory, dtype="float32")
    with pytest.raises(RequestError, match="has no chat template .* --raw"):
        model.chat([{"role": "user", "content": "hi"}])
    assert cli_main(["run", str(directory), "-p", "hello", "-n", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("qwenvl: error:") and "--raw" in error and "\n" not in error
    assert (
        cli_main(["run", str(directory), "-p", "hello world", "--raw", "-n", "3", "--temperature", "0", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] == len(model.tokenizer.encode_raw("hello world"))
    assert cli_main(["run", str(directory), "-p", "hi", "--raw", "--system", "x"]) == 2
    assert "--system" in capsys.readouterr().err


def test_chat_template_from_tokenizer_config(make_llama, tmp_path):
    directory = tmp_path / "chat"
    shutil.copytree(make_llama("gqa", **LLAMA_SHAPES["gqa"]), directory)
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    config = json.loads((directory / "tokenizer_config.json").read_text()) | {"chat_template": template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    model = qwenvl.load(directory, dtype="float32")
    messages = [{"role": "user", "content": "describe the <image> picture"}]
    theirs = AutoTokenizer.from_pretrained(directory, use_fast=False)
    expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert model.prepare(messages).input_ids == list(expected)


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp's "llama" architecture)


@pytest.mark.parametrize("name", LLAMA_SHAPES)
def test_gguf_convert_and_run(make_llama, tmp_path, name):
    directory = make_llama(name, **LLAMA_SHAPES[name])
    path = convert_hf(directory, tmp_path, out_type="f32", progress=False)[0].path
    file = open_gguf_file(path)
    meta = file.metadata
    assert (meta["general.architecture"], meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == (
        "llama",
        "llama",
        "default",
    )
    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert tokens[: processor.get_piece_size()] == [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    assert (tokens[-1], types[-1], types[1]) == ("<image>", TokenType.USER_DEFINED, TokenType.CONTROL)
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is True
    hf = load_file(str(directory / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    q, k = hf["model.layers.1.self_attn.q_proj.weight"], hf["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(file.tensor("blk.1.attn_q.weight"), permute_rows(q, config["num_attention_heads"]))
    assert torch.equal(file.tensor("blk.1.attn_k.weight"), permute_rows(k, config["num_key_value_heads"]))
    assert ("output.weight" in file.tensor_infos) != LLAMA_SHAPES[name].get("tie", False)
    ours = qwenvl.load(path, dtype="float32")
    reference = qwenvl.load(directory, dtype="float32")
    assert ours.config.text == reference.config.text
    with read_gguf(path) as model:  # q / k read back in HF's order
        assert torch.equal(model.tensor("model.layers.1.self_attn.k_proj.weight"), k)
    ids = reference.prepare_raw("the quick brown fox jumps").input_ids
    assert ours.prepare_raw("the quick brown fox jumps").input_ids == ids
    assert greedy(ours, ids) == greedy(reference, ids)
    quantized = convert_hf(directory, tmp_path, out_type="q8_0", progress=False)[0].path
    assert len(greedy(qwenvl.load(quantized, dtype="float32"), ids)) == 24


# ----------------------------------------------------------------------------------------------
# Meta's params.json + consolidated.NN.pth


@pytest.fixture(scope="module")
def meta_dirs(make_llama, tmp_path_factory):
    hf_dir = make_llama("gqa", **LLAMA_SHAPES["gqa"])
    root = tmp_path_factory.mktemp("meta")
    return hf_dir, {n: write_meta(root / f"shards{n}" / "llama-tiny", hf_dir, n) for n in (1, 2)}


def test_meta_shards_merge_to_the_checkpoint(meta_dirs):
    hf_dir, dirs = meta_dirs
    hf = load_file(str(hf_dir / "model.safetensors"))
    for shards, directory in dirs.items():
        params, config, tensors = load_meta(directory)
        assert config.num_key_value_heads == 2 and config.intermediate_size == 160
        assert set(tensors) == set(hf)
        for name, tensor in hf.items():
            assert torch.equal(tensors[name], tensor), (shards, name)
    reference = qwenvl.load(hf_dir, dtype="float32")
    ids = reference.prepare_raw("the quick brown fox jumps").input_ids
    expected = greedy(reference, ids)
    for directory in dirs.values():
        model = qwenvl.load(directory, dtype="float32")
        assert model.prepare_raw("the quick brown fox jumps").input_ids == ids
        assert greedy(model, ids) == expected


def test_meta_convert_to_gguf(meta_dirs, tmp_path):
    hf_dir, dirs = meta_dirs
    path = convert_hf(dirs[2], tmp_path, out_type="f32", progress=False)[0].path
    meta = open_gguf_file(path).metadata
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    reference = qwenvl.load(hf_dir, dtype="float32")
    ids = reference.prepare_raw("a lazy dog").input_ids
    assert greedy(qwenvl.load(path, dtype="float32"), ids) == greedy(reference, ids)


def test_bad_meta_shards_are_one_line(meta_dirs, tmp_path):
    _, dirs = meta_dirs
    shutil.copytree(dirs[2].parent, tmp_path / "mixed")  # the tokenizer.model is in the directory above
    bad = tmp_path / "mixed" / dirs[2].name
    shard = torch.load(bad / "consolidated.01.pth", weights_only=True)
    shard["layers.0.attention.wq.weight"] = shard["layers.0.attention.wq.weight"][:, :32].clone()
    torch.save(shard, bad / "consolidated.01.pth")
    with pytest.raises(ModelFileError, match="consolidated.01.pth: tensor layers.0.attention.wq.weight has shape") as e:
        qwenvl.load(bad)
    assert "\n" not in str(e.value)
    torch.save({"payload": argparse.Namespace(x=1)}, bad / "consolidated.01.pth")  # weights_only refuses it
    with pytest.raises(ModelFileError, match="consolidated.01.pth: cannot load as a weights-only") as e:
        qwenvl.load(bad)
    assert "\n" not in str(e.value)


def test_info(meta_dirs, capsys):
    hf_dir, dirs = meta_dirs
    assert cli_main(["info", str(hf_dir)]) == 0
    text = capsys.readouterr().out
    assert "LlamaForCausalLM" in text and "no (a base model: chat is refused, run --raw)" in text and "(2 kv)" in text
    info = model_info(dirs[2])
    assert (info["format"], info["model"], info["kv_heads"], info["layers"]) == ("meta", "llama", 2, 2)
    assert info["parameters"] == sum(t.numel() for t in load_file(str(hf_dir / "model.safetensors")).values())
    assert cli_main(["info", str(dirs[1])]) == 0
    assert "META (Llama (params.json, 1 shard))" in capsys.readouterr().out


def test_gguf_export_to_hf_loads_in_transformers(make_llama, tmp_path):
    directory = make_llama("gqa", **LLAMA_SHAPES["gqa"])
    gguf_path = convert_hf(directory, tmp_path, out_type="f32", progress=False)[0].path
    assert cli_main(["export", str(gguf_path), "-o", str(tmp_path / "hf")]) == 0
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    original = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 422, 350, 339, 336, 17]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, original(ids).logits)
    ours = qwenvl.load(tmp_path / "hf", dtype="float32")
    assert (
        ours.prepare_raw("the quick brown fox").input_ids
        == qwenvl.load(gguf_path).prepare_raw("the quick brown fox").input_ids
    )
