"""qwen.cpp GGML files (seed 003): read, run, convert to GGUF, describe; bad files refused in one line.

Files are written by tests/qwencpp_fixtures.py from a tiny random Qwen (v1) checkpoint. F32 files
hold the checkpoint's values exactly; quantized files are compared with their dequantized twin (an
HF checkpoint of the values the file's blocks hold).
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from qwencpp_fixtures import header_values, write_qwencpp
from safetensors.torch import load_file, save_file
from tokenizer_fixtures import QWEN_TIKTOKEN

import qwenvl
from qwenvl.cli import main as cli_main
from qwenvl.convert import convert_qwencpp
from qwenvl.errors import ModelFileError
from qwenvl.info import model_info
from qwenvl.weights.gguf import read_gguf
from qwenvl.weights.qwencpp import read_qwencpp

PROMPT = [{"role": "user", "content": "Write a haiku about tensors."}]


@pytest.fixture(scope="module")
def source(make_qwen_v1):
    directory = make_qwen_v1("default")
    config = json.loads((directory / "config.json").read_text())
    return directory, config, load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def files(source, tmp_path_factory):
    """kind → (qwen.cpp file, the HF twin directory of its dequantized values)."""
    directory, config, state = source
    root = tmp_path_factory.mktemp("qwencpp")
    made = {}
    for kind in ("f32", "q8_0", "q4_0"):
        path = root / f"qwen-{kind}.bin"
        twin = write_qwencpp(path, state, config, kind)
        twin_dir = root / f"twin-{kind}"
        shutil.copytree(directory, twin_dir)
        save_file({n: t.contiguous() for n, t in twin.items()}, str(twin_dir / "model.safetensors"), {"format": "pt"})
        made[kind] = (path, twin_dir)
    return made


def chat_greedy(model, steps: int = 24) -> list[int]:
    return model.chat(PROMPT, temperature=0, max_tokens=steps, ignore_eos=True).token_ids


def sequence_logits(model, ids: list[int]) -> torch.Tensor:
    text = model.text_model
    with torch.inference_mode():
        positions = torch.arange(len(ids))[None, None, :].expand(3, 1, -1)
        return text.logits(text(text.embed(torch.tensor([ids])), positions))[0]


def test_header_and_tensors(files, source):
    _, config, state = source
    with read_qwencpp(files["f32"][0]) as model:
        assert model.header.dtype.name == "F32" and model.header.seq_length == config["seq_length"]
        assert model.config.text.intermediate_size == config["intermediate_size"] // 2
        assert model.generation_config.eos_token_ids == (151643, 151645, 151644)
        for name, tensor in state.items():
            assert torch.equal(model.tensor(name), tensor.float()), name  # F32: exact


def test_f32_file_runs_as_the_checkpoint(files, source):
    path, _ = files["f32"]
    ours = qwenvl.load(path, tiktoken=QWEN_TIKTOKEN, dtype="float32")
    reference = qwenvl.load(source[0], dtype="float32")
    assert ours.render(PROMPT) == reference.render(PROMPT)
    expected = chat_greedy(reference)
    assert chat_greedy(ours) == expected
    ids = reference.prepare(PROMPT).input_ids + expected
    assert (sequence_logits(ours, ids) - sequence_logits(reference, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_file_runs_as_its_dequantized_twin(files, kind):
    path, twin_dir = files[kind]
    ours = qwenvl.load(path, tiktoken=QWEN_TIKTOKEN, dtype="float32")
    twin = qwenvl.load(twin_dir, dtype="float32")
    expected = chat_greedy(twin)
    assert chat_greedy(ours) == expected
    ids = twin.prepare(PROMPT).input_ids + expected
    ours_logits, twin_logits = sequence_logits(ours, ids), sequence_logits(twin, ids)
    assert (ours_logits - twin_logits).abs().max() <= 1e-4 * twin_logits.abs().max()


@pytest.mark.parametrize("kind", ["f16", "q4_1", "q5_0", "q5_1"])
def test_every_type_reads_its_blocks(source, tmp_path, kind):
    _, config, state = source
    path = tmp_path / f"{kind}.bin"
    twin = write_qwencpp(path, state, config, kind)
    with read_qwencpp(path) as model:
        assert model.header.dtype.name == kind.upper()
        for name in ("transformer.h.1.attn.c_attn.weight", "transformer.h.0.mlp.w2.weight", "lm_head.weight"):
            assert torch.equal(model.tensor(name), twin[name]), name
            assert (twin[name] - state[name]).abs().max() <= 0.1 * state[name].abs().max()


def test_convert_to_gguf_keeps_the_blocks(files, tmp_path):
    path, twin_dir = files["q4_0"]
    written = convert_qwencpp(path, QWEN_TIKTOKEN, tmp_path, progress=False)
    assert written.path.name == "qwen-q4_0-Q4_0.gguf"
    with read_qwencpp(path) as original, read_gguf(written.path) as converted:
        assert converted.config.arch == "qwen" and converted.config.text == original.config.text
        for name in original.hf_names():
            assert converted.info(name).ggml_type == original.info(name).ggml_type
            assert (converted.raw(name) == original.raw(name)).all(), name
    assert chat_greedy(qwenvl.load(written.path, dtype="float32")) == chat_greedy(
        qwenvl.load(twin_dir, dtype="float32")
    )


def test_cli_run_info_convert(files, tmp_path, capsys):
    path, _ = files["q8_0"]
    args = ["run", str(path), "--tiktoken", str(QWEN_TIKTOKEN), "-p", "Hi", "-n", "4", "--temperature", "0", "--json"]
    assert cli_main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["completion_tokens"] == 4 or result["finish_reason"] == "stop"
    assert cli_main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "QWEN.CPP (QWenLMHeadModel)" in text and "Q8_0" in text
    info = model_info(path)
    assert info["format"] == "qwen.cpp" and info["special_tokens"]["im_end"]["id"] == 151645
    assert cli_main(["convert", str(path), "--tiktoken", str(QWEN_TIKTOKEN), "-o", str(tmp_path)]) == 0
    assert (tmp_path / "qwen-q8_0-Q8_0.gguf").is_file()


# ----------------------------------------------------------------------------------------------
# Bad files


def test_the_seeds_q5_0_slicing_slip_always_raises():
    """quantize_q5_0 ORs [n, 16] with tensor[: 16:], rows 0-15 of all 32 columns: never broadcastable,
    so qwen.cpp's convert.py cannot write a Q5_0 file (it dies on the first 2-D tensor)."""
    for rows in (1, 15, 16, 17, 64):
        tensor = torch.randint(0, 31, (rows, 32), dtype=torch.int8)
        with pytest.raises(RuntimeError):
            (tensor[:, :16] & 0x0F) | (tensor[:16:] << 4)


def _expect_one_line(path, match, tiktoken=QWEN_TIKTOKEN, capsys=None):
    with pytest.raises(ModelFileError, match=match) as error:
        qwenvl.load(path, tiktoken=tiktoken)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_bad_files_are_refused_in_one_line(files, source, tmp_path, capsys):
    good = files["q8_0"][0].read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(good[: len(good) // 2])
    _expect_one_line(cut, "truncated file")
    magic = tmp_path / "magic.bin"
    magic.write_bytes(b"ggmf" + good[4:])
    assert cli_main(["run", str(magic), "--tiktoken", str(QWEN_TIKTOKEN), "-p", "hi"]) == 2
    assert "qwenvl: error:" in capsys.readouterr().err
    unknown = bytearray(good)
    name_length = struct.unpack_from("<i", unknown, 52)[0]
    struct.pack_into("<i", unknown, 52 + 4 + name_length + 4 + 8, 5)  # the first tensor's type: 5 (no such)
    (tmp_path / "type.bin").write_bytes(unknown)
    _expect_one_line(tmp_path / "type.bin", "unknown GGML type 5")
    foreign = tmp_path / "chatglm.bin"  # chatglm.cpp's files also start with b"ggml": model type, version, ...
    foreign.write_bytes(b"ggml" + struct.pack("<14i", 2, 1, 65024, 4096, 32, 2, 28, 13696, 32768, 1, 2, 0, 0, 0))
    _expect_one_line(foreign, "not a qwen.cpp Qwen file")
    _expect_one_line(files["q8_0"][0], "pass its qwen.tiktoken", tiktoken=None)


def test_a_q5_0_file_from_qwen_cpps_converter_is_explained(source, tmp_path):
    """What ``convert.py -t q5_0`` leaves: the header and the first tensor's header, then nothing."""
    _, config, _ = source
    path = tmp_path / "qwen7b-ggml.bin"
    name = b"transformer.wte.weight"
    head = b"ggml" + struct.pack("<12i", *header_values(config, "q5_0"))
    head += struct.pack("<i", len(name)) + name + struct.pack("<4i", 2, config["vocab_size"], config["hidden_size"], 6)
    path.write_bytes(head)
    _expect_one_line(path, "truncated file .*quantize_q5_0")
