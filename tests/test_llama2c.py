"""``qwenvl export --format llama2c / llama2c-q8``: llama2.c's files read back by a reader written from
its format (tests/llama2c_reader.py), whose run.c-style forward (interleaved rope pairs) must give the
logits of the HF checkpoint; unrepresentable models refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece
import torch
from llama2c_reader import forward, read_llama2c, read_tokenizer_bin

import qwenvl
from qwenvl.cli import main as cli_main
from qwenvl.errors import QwenVLError
from qwenvl.weights.llama2c import export_llama2c

SHAPES = {
    "gqa": dict(heads=4, kv_heads=2),  # llama2.c's own export.py gets k wrong here
    "mqa-tied": dict(heads=4, kv_heads=1, tie=True, ffn=192),
}
PROMPT = "the quick brown fox jumps over the lazy dog"


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    text = model.text_model
    with torch.inference_mode():
        positions = torch.arange(len(ids))[None, None, :].expand(3, 1, -1)
        return text.logits(text(text.embed(torch.tensor([ids])), positions))[0]


@pytest.mark.parametrize("name", SHAPES)
def test_legacy_file_runs_as_the_checkpoint(make_llama, tmp_path, name):
    directory = make_llama(name, **SHAPES[name])
    files = export_llama2c(directory, tmp_path / "model.bin", seq_len=64)
    exported = read_llama2c(files.model)
    config = json.loads((directory / "config.json").read_text())
    assert (exported.version, exported.dim, exported.hidden_dim, exported.n_layers) == (
        0,
        64,
        config["intermediate_size"],
        2,
    )
    assert (exported.n_heads, exported.n_kv_heads, exported.seq_len) == (4, config["num_key_value_heads"], 64)
    assert (exported.vocab_size, exported.shared) == (config["vocab_size"], SHAPES[name].get("tie", False))
    model = qwenvl.load(directory, dtype="float32")
    ids = model.tokenizer.encode_raw(PROMPT)
    assert (forward(exported, ids) - hf_logits(model, ids)).abs().max() <= 1e-4
    head = 16
    angles = torch.arange(64).float()[:, None] * (1.0 / 10000.0 ** (torch.arange(0, head, 2).float() / head))
    assert torch.allclose(exported.weights["freq_cos"], angles.cos()) and torch.allclose(
        exported.weights["freq_sin"], angles.sin()
    )


@pytest.mark.parametrize("name", SHAPES)
def test_q8_file_runs_as_its_dequantized_weights(make_llama, tmp_path, name):
    directory = make_llama(name, **SHAPES[name])
    files = export_llama2c(directory, tmp_path / "modelq.bin", quantized=True, seq_len=32)
    exported = read_llama2c(files.model)
    assert exported.version == 2 and exported.group_size == files.group_size
    assert exported.dim % exported.group_size == 0 and exported.hidden_dim % exported.group_size == 0
    fp32 = read_llama2c(export_llama2c(directory, tmp_path / "model.bin", seq_len=32).model)
    for key, values in fp32.weights.items():
        if key.startswith(("freq", "cls")):
            continue
        if values.ndim == 2:  # within half a quantization step of each group
            groups = values.reshape(-1, exported.group_size)
            step = groups.abs().max(dim=1, keepdim=True).values / 127
            assert ((exported.weights[key].reshape_as(groups) - groups).abs() <= step / 2 + 1e-7).all(), key
        else:
            assert torch.equal(exported.weights[key], values), key
    model = qwenvl.load(directory, dtype="float32")
    ids = model.tokenizer.encode_raw(PROMPT)
    expected = hf_logits(model, ids)
    cosine = torch.nn.functional.cosine_similarity(forward(exported, ids).flatten(), expected.flatten(), dim=0)
    assert cosine >= 0.99


def test_tokenizer_bin(make_llama, tmp_path):
    directory = make_llama("gqa", **SHAPES["gqa"])
    files = export_llama2c(directory, tmp_path / "model.bin")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    rows = json.loads((directory / "config.json").read_text())["vocab_size"]
    max_length, entries = read_tokenizer_bin(files.tokenizer, rows)
    assert max_length == max(len(data) for _, data in entries)
    assert entries[1][1] == b"\n<s>\n" and entries[2][1] == b"\n</s>\n"
    for token_id in (3, 100, processor.get_piece_size() - 1):
        piece = processor.id_to_piece(token_id).replace("\u2581", " ").encode()
        assert entries[token_id] == (processor.get_score(token_id), piece)
    assert entries[-1] == (-1000.0, b"<image>")  # the added token, beyond the SentencePiece pieces


def test_cli_and_refusals(make_llama, make_qwen2, tmp_path, capsys):
    directory = make_llama("gqa", **SHAPES["gqa"])
    out = tmp_path / "out" / "model.bin"
    assert cli_main(["export", str(directory), "--format", "llama2c", "-o", str(out)]) == 0
    assert "llama2.c legacy" in capsys.readouterr().out and (out.parent / "tokenizer.bin").is_file()
    assert cli_main(["export", str(directory), "--format", "llama2c-q8", "-o", str(out.parent / "q.bin")]) == 0
    assert cli_main(["export", str(directory), "--format", "llama2c", "-o", str(out)]) == 2  # exists
    assert "exists (pass --force" in capsys.readouterr().err
    refusals = {"qwen2": (make_qwen2("default"), "a qwen2 model: llama2.c runs Llama models only")}
    theta = tmp_path / "theta"
    shutil.copytree(directory, theta)
    config = json.loads((theta / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (theta / "config.json").write_text(json.dumps(config))
    refusals["theta"] = (theta, "rope base 500000: llama2.c's rope base is fixed at 10000")
    biased = tmp_path / "bias"
    shutil.copytree(directory, biased)
    (biased / "config.json").write_text(json.dumps(config | {"rope_parameters": None, "mlp_bias": True}))
    refusals["bias"] = (biased, "the model has biases")
    for name, (model_dir, message) in refusals.items():
        with pytest.raises(QwenVLError, match=message) as error:
            export_llama2c(model_dir, tmp_path / name / "model.bin")
        assert "\n" not in str(error.value) and not (tmp_path / name / "model.bin").exists()
    capsys.readouterr()
    assert cli_main(["export", str(theta), "--format", "llama2c", "-o", str(tmp_path / "x.bin")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
