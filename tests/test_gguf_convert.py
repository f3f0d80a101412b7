"""`qwenvl convert` / `quantize` / `export` / `info` on tiny random Qwen2-VL and Qwen2.5-VL checkpoints.

References computed live: transformers (the HF run, and loading exports), llama.cpp's ``gguf`` package
(its constants name every key and tensor its converter writes, and its GGUFReader reads our files).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType, Keys
from gguf_vl_fixtures import (
    ALL_CONFIGS,
    LOW_BIT_CONFIGS,
    MEDIA,
    VL_CONFIGS,
    image_messages,
    sequence_logits,
    write_test_image,
)

import qwenvl
from qwenvl.cli import main as cli_main
from qwenvl.config import model_config_from_hf
from qwenvl.convert import convert_hf, quantize_gguf, summary_table, tensor_type
from qwenvl.errors import QwenVLError
from qwenvl.models.text import TextModel
from qwenvl.weights import names
from qwenvl.weights.gguf import open_gguf_file, read_gguf
from qwenvl.weights.layout import QWEN2, canonical_name

Q = GGMLQuantizationType
ARCHS = list(VL_CONFIGS)
QUANTIZED = ["q4_0", "q4_1", "q5_0", "q5_1"]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    return write_test_image(tmp_path_factory.mktemp("img") / "picture.png", 150, 100)


@pytest.fixture(scope="module")
def converted(make_vl, tmp_path_factory):
    """converted(name, type) → (text GGUF, mmproj GGUF), made once. f32 and q8_0 come from convert;
    the other types from quantizing the f32 text GGUF (the same bytes: their values are the f32
    ones), paired with the q8_0 mmproj (an f16 mmproj for f16)."""
    made: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(name: str, kind: str) -> tuple[Path, Path]:
        if (name, kind) not in made:
            out = tmp_path_factory.mktemp(f"gguf-{name}-{kind}")
            if kind in ("f32", "q8_0"):
                hf_dir = make_vl(name, **ALL_CONFIGS[name])
                text, mmproj = convert_hf(hf_dir, out, out_type=kind, progress=False)
                made[name, kind] = (text.path, mmproj.path)
            else:
                text32, mmproj32 = get(name, "f32")
                text = quantize_gguf(text32, out / f"text-{kind}.gguf", kind, progress=False).path
                if kind == "f16":
                    mmproj = quantize_gguf(mmproj32, out / "mmproj-f16.gguf", "f16", progress=False).path
                else:
                    mmproj = get(name, "q8_0")[1]
                made[name, kind] = (text, mmproj)
        return made[name, kind]

    return get


@pytest.fixture(scope="module")
def reference(make_vl, image):
    """The f32 HF checkpoint run by transformers: its greedy continuation of the image prompt."""
    from test_vl import hf_inputs, hf_model

    results = {}

    def get(arch: str) -> list[int]:
        if arch not in results:
            hf_dir = make_vl(arch, **VL_CONFIGS[arch])
            messages = image_messages(image)
            inputs = hf_inputs(hf_dir, messages, [image])
            with torch.inference_mode():
                out = hf_model(hf_dir, VL_CONFIGS[arch]["arch"]).generate(**inputs, do_sample=False, max_new_tokens=24)
            results[arch] = out[0, inputs["input_ids"].shape[1] :].tolist()
        return results[arch]

    return get


# ----------------------------------------------------------------------------------------------
# Round trip: convert → load the GGUF pair → generate


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_gguf_generates_what_transformers_does(converted, reference, image, arch):
    text, mmproj = converted(arch, "f32")
    model = qwenvl.load(text, mmproj=mmproj, dtype="float32")
    assert model.config.arch == VL_CONFIGS[arch]["arch"] and model.vision_model is not None
    result = model.chat(image_messages(image), temperature=0, max_tokens=24, **MEDIA)
    assert result.token_ids == reference(arch)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_f16_and_q8_0_agree_on_top1(converted, reference, image, arch, kind):
    expected = reference(arch)
    text, mmproj = converted(arch, kind)
    model = qwenvl.load(text, mmproj=mmproj, dtype="float32")
    predicted = sequence_logits(model, image_messages(image), expected).argmax(dim=-1).tolist()
    agreement = np.mean([a == b for a, b in zip(predicted, expected)])
    print(f"{arch} {kind}: top-1 agreement {agreement:.3f}")
    assert agreement >= 0.9


# The text quantizers do not depend on the vision half: the first architecture runs in `make test`,
# the others with the slow checks.
LOW_BIT_ARCHS = [
    arch if index == 0 else pytest.param(arch, marks=pytest.mark.slow) for index, arch in enumerate(LOW_BIT_CONFIGS)
]


@pytest.mark.parametrize("arch", LOW_BIT_ARCHS)
def test_4_and_5_bit_logits_stay_close(converted, tmp_path, image, arch):
    """The text GGUF in each 4/5-bit type against the f32 one, the f32 mmproj feeding both."""
    text32, mmproj32 = converted(arch, "f32")
    base = qwenvl.load(text32, mmproj=mmproj32, dtype="float32")
    continuation = base.chat(image_messages(image), temperature=0, max_tokens=24, **MEDIA).token_ids
    expected = sequence_logits(base, image_messages(image), continuation).flatten()
    for kind in QUANTIZED:
        text = quantize_gguf(text32, tmp_path / f"{kind}.gguf", kind, progress=False).path
        model = dataclasses.replace(base, text_model=gguf_text_model(text))
        logits = sequence_logits(model, image_messages(image), continuation).flatten()
        cosine = torch.nn.functional.cosine_similarity(logits, expected, dim=0).item()
        print(f"{arch} {kind}: logits cosine {cosine:.5f}")
        assert cosine >= 0.99, kind


def gguf_text_model(path: Path) -> TextModel:
    """The text model of a GGUF alone (no tokenizer, no vision), built as qwenvl.load builds it."""
    with read_gguf(path) as source:
        with torch.device("meta"):
            model = TextModel(source.config.text)
        model.load_weights(dict(source.tensors()))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Inventory: what llama.cpp's converter writes, by gguf's constants


def _keys_of(cls: type) -> set[str]:
    found = set()
    for value in vars(cls).values():
        if isinstance(value, str) and "." in value:
            found.add(value)
        elif isinstance(value, type):
            found |= _keys_of(value)
    return found


KNOWN_KEYS = {key.replace("{arch}", arch) for key in _keys_of(Keys) for arch in ("qwen2", "qwen2vl")}
# qwenvl's own, each written only when llama.cpp's fixed value would be wrong (docs/convert.md)
QWENVL_KEYS = {"clip.vision.fullatt_block_indexes", "clip.vision.tokens_per_second"}


def _tensor_names(arch: MODEL_ARCH, blocks: int) -> set[str]:
    # mm.{bid} numbers the merger's layers (0 and 2), not the blocks: llama.cpp's own converter
    # cannot map mm.2 for a ViT of fewer than 3 blocks (its name map stops at the block count)
    stems = {TENSOR_NAMES[t].format(bid=b) for t in MODEL_TENSORS[arch] for b in range(max(blocks, 3))}
    return {stem + suffix for stem in stems for suffix in (".weight", ".bias", ".weight.1")}


@pytest.mark.parametrize("arch", ARCHS)
def test_keys_and_tensors_are_llama_cpps(converted, make_vl, arch):
    hf_dir = make_vl(arch, **VL_CONFIGS[arch])
    config = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    text_path, mm_path = converted(arch, "q8_0")
    text = open_gguf_file(text_path)  # equal to gguf.GGUFReader's reading (tests/test_gguf_read.py), faster
    mm_reader = gguf.GGUFReader(mm_path)  # llama.cpp's own reader

    assert set(text.metadata) <= KNOWN_KEYS, set(text.metadata) - KNOWN_KEYS
    assert text.metadata["general.architecture"] == "qwen2vl"
    assert text.metadata["qwen2vl.rope.dimension_sections"] == [*config.text.mrope_section, 0]
    assert text.metadata["tokenizer.ggml.pre"] == "qwen2"
    assert text.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert len(text.metadata["tokenizer.ggml.tokens"]) == config.text.vocab_size
    allowed = _tensor_names(MODEL_ARCH.QWEN2VL, config.text.num_hidden_layers)
    hf_shapes = {canonical_name(n): tuple(t.shape) for n, t in _hf_state(hf_dir).items()}
    for name, info in text.tensor_infos.items():
        assert name in allowed
        assert info.shape == hf_shapes[QWEN2.to_hf(name)]
        assert info.ggml_type == (Q.F32 if len(info.shape) == 1 else Q.Q8_0), name
    assert ("output.weight" in text.tensor_infos) != config.text.tie_word_embeddings

    mm_keys = {k for k in mm_reader.fields if not k.startswith("GGUF.")}
    assert mm_keys <= KNOWN_KEYS | QWENVL_KEYS, mm_keys - KNOWN_KEYS - QWENVL_KEYS
    projector = {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger"}[config.arch]
    assert mm_reader.fields["clip.projector_type"].contents() == projector
    assert mm_reader.fields["clip.vision.projection_dim"].contents() == config.text.hidden_size
    allowed = _tensor_names(MODEL_ARCH.MMPROJ, config.vision.depth)
    written = {t.name: t for t in mm_reader.tensors}
    assert set(written) <= allowed, set(written) - allowed
    patch = hf_shapes["visual.patch_embed.proj.weight"]
    for name in names.GGUF_PATCH_EMBED:
        assert tuple(reversed(written[name].shape.tolist())) == (*patch[:2], *patch[3:])
        assert written[name].tensor_type == Q.F32  # F16 only in an F16 file, as llama.cpp does
    qkv = hf_shapes["visual.blocks.0.attn.qkv.weight"]
    for part in "qkv":
        assert tuple(reversed(written[f"v.blk.0.attn_{part}.weight"].shape.tolist())) == (qkv[0] // 3, qkv[1])
    if config.arch == "qwen2_5_vl":
        assert mm_reader.fields["clip.use_silu"].contents() is True
        assert mm_reader.fields["clip.vision.n_wa_pattern"].contents() == 2  # fullatt [1] of 2 blocks
        assert mm_reader.fields["clip.vision.window_size"].contents() == 56  # not llama.cpp's 112
        # the MLP is 48 wide: down_proj's rows do not split into Q8_0 blocks of 32
        assert written["v.blk.0.ffn_down.weight"].tensor_type == Q.F16
        assert written["v.blk.0.ffn_up.weight"].tensor_type == Q.Q8_0


def _hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(hf_dir / "model.safetensors")


def test_type_rules():
    assert tensor_type("blk.0.attn_norm.weight", (64,), Q.Q4_0) == (Q.F32, "")
    assert tensor_type("blk.0.attn_q.bias", (64,), Q.Q4_0) == (Q.F32, "")
    assert tensor_type("blk.0.attn_q.weight", (64, 64), Q.Q4_0) == (Q.Q4_0, "")
    assert tensor_type("v.patch_embd.weight.1", (32, 3, 14, 14), Q.F16, mmproj=True) == (Q.F16, "")
    assert tensor_type("v.patch_embd.weight", (32, 3, 14, 14), Q.Q8_0, mmproj=True) == (Q.F32, "")
    kind, note = tensor_type("blk.0.ffn_gate.weight", (4864, 896), Q.Q4_K)
    assert kind == Q.Q5_0 and "896" in note  # as the registry Q4_K_M GGUF stores its ffn_gate
    assert tensor_type("blk.0.ffn_down.weight", (896, 4864), Q.Q4_K) == (Q.Q4_K, "")
    # below 8 bits the output projection gets 6 bits (8 when its rows do not split into 256-blocks)
    assert tensor_type("output.weight", (151936, 1024), Q.Q4_0)[0] == Q.Q6_K
    assert tensor_type("output.weight", (151936, 896), Q.Q4_0)[0] == Q.Q8_0
    assert tensor_type("token_embd.weight", (151936, 1024), Q.Q4_0, tied=True)[0] == Q.Q6_K
    assert tensor_type("token_embd.weight", (151936, 1024), Q.Q4_0) == (Q.Q4_0, "")
    assert tensor_type("output.weight", (151936, 1024), Q.Q8_0) == (Q.Q8_0, "")
    assert tensor_type("blk.0.ffn_down.weight", (64, 48), Q.Q4_K)[0] == Q.F16  # 48: no 32-blocks either
    assert tensor_type("blk.0.ffn_down.weight", (64, 48), Q.BF16) == (Q.BF16, "")


# ----------------------------------------------------------------------------------------------
# The commands


def test_cli_convert_prints_the_summary_and_protects_files(make_vl, tmp_path, capsys):
    hf_dir = make_vl("qwen2_5_vl-w56", **VL_CONFIGS["qwen2_5_vl-w56"])
    args = ["convert", str(hf_dir), "-o", str(tmp_path), "--type", "q5_1", "--mmproj-type", "f16"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    stem = hf_dir.name
    assert f"{stem}-Q5_1.gguf (qwen2vl, Q5_1)" in out and f"mmproj-{stem}-F16.gguf (clip, F16)" in out
    text = open_gguf_file(tmp_path / f"{stem}-Q5_1.gguf")
    types = {name: info.ggml_type for name, info in text.tensor_infos.items()}
    assert set(types.values()) == {Q.F32, Q.Q5_1, Q.Q8_0}
    assert types["output.weight"] == Q.Q8_0  # 6 bits wanted, 64-wide rows: 8
    assert "output projection" in out
    assert "Q5_1" in out and "total" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{stem}-Q5_1.gguf", f"mmproj-{stem}-F16.gguf"])

    assert cli_main(args) == 2  # the outputs exist
    assert "exists (pass --force" in capsys.readouterr().err
    assert cli_main(args + ["--force"]) == 0
    capsys.readouterr()
    source = tmp_path / f"{stem}-Q5_1.gguf"
    assert cli_main(["quantize", str(source), str(source), "q8_0"]) == 2
    assert "input" in capsys.readouterr().err
    assert source.stat().st_size > 0 and open_gguf_file(source).tensor_infos


def test_cli_quantize_and_info(converted, tmp_path, capsys):
    text, mmproj = converted("qwen2_vl-d2", "f32")
    out = tmp_path / "q5_0.gguf"
    assert cli_main(["quantize", str(text), str(out), "q5_0"]) == 0
    assert "Q5_0" in capsys.readouterr().out
    assert cli_main(["info", str(out), "--mmproj", str(mmproj), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    source = open_gguf_file(text)
    assert info["architecture"] == "qwen2vl" and info["model"] == "qwen2_vl"
    assert set(info["tensor_types"]) == {"Q5_0", "Q8_0", "F32"}
    assert info["tensor_types"]["Q8_0"]["tensors"] == 1  # output.weight
    assert info["parameters"] == sum(int(np.prod(i.shape)) for i in source.tensor_infos.values())
    assert info["special_tokens"]["eos"] == {"id": 151645, "token": "<|im_end|>"}
    assert info["chat_template"] is True and info["context_length"] == 4096
    assert info["vision"]["variant"] == "qwen2_vl" and info["vision"]["depth"] == 2
    # the metadata is copied key for key, only general.file_type changes
    copied = open_gguf_file(out)
    changed = {k for k in source.metadata if source.metadata[k] != copied.metadata.get(k)}
    assert changed == {"general.file_type"} and copied.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q5_0
    assert cli_main(["info", str(mmproj)]) == 0
    assert "qwen2_vl: 2 blocks" in capsys.readouterr().out
    assert cli_main(["quantize", str(mmproj), str(tmp_path / "mm.gguf"), "q4_0"]) == 2
    assert "mmproj" in capsys.readouterr().err


def test_info_of_an_hf_checkpoint(make_vl, capsys):
    hf_dir = make_vl("qwen2_5_vl-w56", **VL_CONFIGS["qwen2_5_vl-w56"])
    assert cli_main(["info", str(hf_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    state = _hf_state(hf_dir)
    assert info["architecture"] == "Qwen2_5_VLForConditionalGeneration" and info["model"] == "qwen2_5_vl"
    assert info["parameters"] == sum(t.numel() for t in state.values())
    assert info["tensor_types"] == {
        "F32": {
            "tensors": len(state),
            "parameters": info["parameters"],
            "bytes": sum(t.numel() * 4 for t in state.values()),
        }
    }
    assert info["special_tokens"]["eos"]["token"] == "<|im_end|>" and info["chat_template"]


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_transformers_and_generates_alike(converted, make_vl, reference, image, tmp_path, capsys, arch):
    from test_vl import hf_inputs, hf_model

    text, mmproj = converted(arch, "f32")
    out = tmp_path / "hf"
    assert cli_main(["export", str(text), "--mmproj", str(mmproj), "-o", str(out)]) == 0
    capsys.readouterr()
    original = _hf_state(make_vl(arch, **VL_CONFIGS[arch]))
    exported = _hf_state(out)
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    model = hf_model(out, VL_CONFIGS[arch]["arch"])
    inputs = hf_inputs(out, image_messages(image), [image])
    with torch.inference_mode():
        tokens = model.generate(**inputs, do_sample=False, max_new_tokens=24)[0, inputs["input_ids"].shape[1] :]
    assert tokens.tolist() == reference(arch)


def test_export_errors(converted, tmp_path, capsys):
    text, mmproj = converted("qwen2_vl-d2", "f32")
    assert cli_main(["export", str(text), "-o", str(tmp_path / "out")]) == 2
    assert "needs its vision projector (--mmproj)" in capsys.readouterr().err
    assert cli_main(["export", str(text), "--mmproj", str(mmproj), "-o", str(text.parent), "--force"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert text.is_file()


def test_unknown_type_and_non_qwen_tokenizer(make_qwen2, tmp_path):
    hf_dir = make_qwen2("default")
    with pytest.raises(QwenVLError, match="--type 'q4_k'"):
        convert_hf(hf_dir, tmp_path, out_type="q4_k")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in hf_dir.iterdir():
        (broken / file.name).symlink_to(file)
    (broken / "tokenizer.json").unlink()
    document = json.loads((hf_dir / "tokenizer.json").read_text())
    document["pre_tokenizer"] = {"type": "Whitespace"}
    (broken / "tokenizer.json").write_text(json.dumps(document))
    with pytest.raises(QwenVLError, match="not a Qwen2 byte-level BPE tokenizer"):
        convert_hf(broken, tmp_path / "out", out_type="f16")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_qwen2_text_model_round_trip(make_qwen2, tmp_path):
    hf_dir = make_qwen2("default")
    (written,) = convert_hf(hf_dir, tmp_path, out_type="f32", progress=False)
    assert written.architecture == "qwen2" and "F32" in summary_table(written)
    messages = [{"role": "user", "content": "Write a haiku about tensors."}]
    reference = qwenvl.load(hf_dir, dtype="float32").chat(messages, temperature=0, max_tokens=16)
    ours = qwenvl.load(written.path, dtype="float32")
    assert ours.chat(messages, temperature=0, max_tokens=16).token_ids == reference.token_ids
    bf16 = quantize_gguf(written.path, tmp_path / "bf16.gguf", "bf16", progress=False)
    predicted = sequence_logits(qwenvl.load(bf16.path, dtype="float32"), messages, reference.token_ids).argmax(-1)
    assert np.mean([a == b for a, b in zip(predicted.tolist(), reference.token_ids)]) >= 0.9
