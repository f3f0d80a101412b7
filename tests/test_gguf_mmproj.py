"""Vision projector GGUFs (mmproj): llama.cpp's current layout and the older qwen2_vl_surgery.py one,
read into the same vision model as the HF checkpoint; and every way a GGUF pair can be wrong.

The reference is the HF checkpoint loaded by qwenvl (tests/test_vl.py holds that to transformers).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_vl_fixtures import MEDIA, VL_CONFIGS, write_legacy_mmproj, write_test_image

import qwenvl
from qwenvl.convert import convert_hf
from qwenvl.errors import ModelFileError
from qwenvl.media.image import load_image, preprocess_image
from qwenvl.weights.mmproj import fullatt_from_pattern, pattern_from_fullatt, read_mmproj

ARCHS = list(VL_CONFIGS)


@pytest.fixture(scope="module")
def pairs(make_vl, tmp_path_factory):
    """pairs(arch) → (HF dir, text GGUF, mmproj GGUF), f32."""
    made = {}

    def get(arch: str) -> tuple[Path, Path, Path]:
        if arch not in made:
            hf_dir = make_vl(arch, **VL_CONFIGS[arch])
            text, mmproj = convert_hf(hf_dir, tmp_path_factory.mktemp(arch), out_type="f32", progress=False)
            made[arch] = (hf_dir, text.path, mmproj.path)
        return made[arch]

    return get


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    return write_test_image(tmp_path_factory.mktemp("img") / "wide.png", 200, 90, seed=3)


def _vision_output(model: qwenvl.api.Model, image: str) -> torch.Tensor:
    processed = preprocess_image(load_image(image), model.preprocess_config, **MEDIA)
    return model.encode_pixels(processed.pixel_values, processed.grid_thw)


@pytest.mark.parametrize("arch", ARCHS)
def test_mmproj_tensors_are_the_hf_ones(pairs, arch):
    from safetensors.torch import load_file

    hf_dir, _, mmproj = pairs(arch)
    state = {name: t for name, t in load_file(hf_dir / "model.safetensors").items() if name.startswith("visual.")}
    with read_mmproj(mmproj) as projector:
        assert not projector.legacy and projector.variant == VL_CONFIGS[arch]["arch"]
        tensors = dict(projector.tensors())
    assert set(tensors) == set(state)
    for name, tensor in state.items():
        assert torch.equal(tensors[name], tensor), name  # q/k/v and the Conv3d joined back exactly


@pytest.mark.parametrize("arch", ARCHS)
def test_legacy_surgery_layout_reads_the_same(pairs, image, tmp_path, arch):
    hf_dir, text, _ = pairs(arch)
    legacy = tmp_path / "legacy-mmproj.gguf"
    write_legacy_mmproj(hf_dir, legacy)
    reference = qwenvl.load(hf_dir, dtype="float32")
    model = qwenvl.load(text, mmproj=legacy, dtype="float32")
    with read_mmproj(legacy) as projector:
        assert projector.legacy  # ffn_down holds the first MLP layer
    ours, theirs = model.config.vision, reference.config.vision
    for field in (
        "variant",
        "depth",
        "hidden_size",
        "num_heads",
        "intermediate_size",
        "out_hidden_size",
        "hidden_act",
        "patch_size",
        "spatial_merge_size",
    ):
        assert getattr(ours, field) == getattr(theirs, field), field
    if arch.startswith("qwen2_5"):
        assert (ours.window_size, ours.fullatt_block_indexes) == (theirs.window_size, theirs.fullatt_block_indexes)
    assert torch.equal(_vision_output(model, image), _vision_output(reference, image))
    assert model.preprocess_config == reference.preprocess_config


def test_window_pattern_round_trip():
    assert fullatt_from_pattern(8, 32) == (7, 15, 23, 31)  # Qwen2.5-VL's published blocks
    assert pattern_from_fullatt((7, 15, 23, 31), 32) == 8
    assert pattern_from_fullatt((), 2) == 3 and fullatt_from_pattern(3, 2) == ()  # no full block
    assert pattern_from_fullatt((0, 3), 4) is None  # irregular: written as fullatt_block_indexes


def test_gguf_pair_answers_like_the_hf_checkpoint_through_the_cli(pairs, image, capsys):
    import json

    from qwenvl.cli import main as cli_main

    hf_dir, text, mmproj = pairs("qwen2_5_vl-w56")
    common = [
        "-p",
        "Describe the picture.",
        "--image",
        image,
        "--temperature",
        "0",
        "-n",
        "12",
        "--json",
        "--dtype",
        "float32",
        "--min-pixels",
        str(MEDIA["min_pixels"]),
        "--max-pixels",
        str(MEDIA["max_pixels"]),
    ]
    assert cli_main(["run", str(text), "--mmproj", str(mmproj), *common]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert cli_main(["run", str(hf_dir), *common]) == 0
    reference = json.loads(capsys.readouterr().out)
    assert ours["tokens"] == reference["tokens"] and ours["prompt_tokens"] == reference["prompt_tokens"]


# ----------------------------------------------------------------------------------------------
# Bad files and bad pairs


def _error(text: Path, mmproj: Path | None = None) -> str:
    with pytest.raises(ModelFileError) as caught:
        qwenvl.load(text, mmproj=mmproj, dtype="float32")
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_mmproj_files(pairs, tmp_path):
    _, text, mmproj = pairs("qwen2_vl-d2")
    not_gguf = tmp_path / "mmproj.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert "not a GGUF file (wrong magic bytes)" in _error(text, not_gguf)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(mmproj.read_bytes()[:-5000])
    message = _error(text, cut)
    assert "truncated" in message and str(cut) in message

    odd = tmp_path / "odd.gguf"
    shutil.copy(mmproj, odd)
    reader = gguf.GGUFReader(odd, "r+")
    reader.tensors[2].field.parts[4][0] = 99  # the tensor info's raw ggml type
    name = reader.tensors[2].name
    reader.data.flush()
    del reader
    assert f"tensor {name} has unknown tensor type 99" in _error(text, odd)

    far = tmp_path / "far.gguf"
    shutil.copy(mmproj, far)
    reader = gguf.GGUFReader(far, "r+")
    reader.tensors[-1].field.parts[5][0] = 1 << 40  # its data offset
    name = reader.tensors[-1].name
    reader.data.flush()
    del reader
    message = _error(text, far)
    assert "bad tensor offset" in message and name in message


def test_mmproj_of_another_model(pairs, make_vl, tmp_path):
    _, text, mmproj = pairs("qwen2_vl-d2")
    wide = make_vl(  # tests/test_vl.py's "qwen2_vl-d3-h4"
        "qwen2_vl-d3-h4",
        arch="qwen2_vl",
        hidden=96,
        heads=4,
        kv_heads=1,
        ffn=128,
        mrope_section=[4, 4, 4],
        tie=True,
        vision={"depth": 3, "embed_dim": 48, "num_heads": 4, "mlp_ratio": 3},
    )
    wide_text, wide_mmproj = (w.path for w in convert_hf(wide, tmp_path, out_type="q8_0", progress=False))
    message = _error(text, wide_mmproj)
    assert "outputs 96-wide embeddings" in message and "hidden size 64" in message and "another model" in message
    assert "not a vision projector (architecture 'qwen2vl'" in _error(text, text)
    assert "a vision projector: pass the text model's GGUF" in _error(mmproj)
    assert "unexpected tensor" in _error(text, _with_extra_tensor(mmproj, tmp_path / "extra.gguf"))


def test_mmproj_with_a_qwen2_text_model_and_other_projectors(pairs, make_qwen2, tmp_path):
    _, _, mmproj = pairs("qwen2_vl-d2")
    (qwen2,) = convert_hf(make_qwen2("default"), tmp_path, out_type="q8_0", progress=False)
    message = _error(qwen2.path, mmproj)
    assert "qwen2 text model" in message and "belongs to another model" in message
    gemma = tmp_path / "gemma-mmproj.gguf"
    writer = gguf.GGUFWriter(gemma, "clip")
    writer.add_string("clip.projector_type", "gemma3")
    writer.add_tensor("v.patch_embd.weight", np.zeros((4, 3, 14, 14), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, text, _ = pairs("qwen2_vl-d2")
    assert "unsupported projector type 'gemma3'" in _error(text, gemma)


def _with_extra_tensor(mmproj: Path, path: Path) -> Path:
    """A copy of the mmproj with one more tensor, named as no Qwen-VL projector has."""
    from qwenvl.weights.gguf import open_gguf_file

    source = open_gguf_file(mmproj)
    writer = gguf.GGUFWriter(path, "clip")
    for key, value in source.metadata.items():
        if key != "general.architecture":
            kind, element = source.value_types[key]
            writer.add_key_value(key, value, kind, sub_type=element)
    for name in source.tensor_infos:
        writer.add_tensor(name, source.tensor(name).numpy())
    writer.add_tensor("v.blk.0.attn_qkv.weight", np.zeros((96, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
