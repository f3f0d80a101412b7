"""Bad input gives one clear line naming the file or field, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwenvl
from qwenvl.cli import main as cli_main
from qwenvl.errors import ModelFileError, QwenVLError, RequestError


@pytest.fixture
def checkpoint_copy(make_qwen2, tmp_path):
    """A writable copy of a tiny Qwen2 checkpoint."""
    target = tmp_path / "model"
    shutil.copytree(make_qwen2("default"), target)
    return target


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_directory():
    with pytest.raises(ModelFileError, match="no-such-model: no such model directory"):
        qwenvl.load("./no-such-model")


def test_missing_config(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(
        ModelFileError, match=r"not a model: expected a checkpoint directory \(config\.json \+ weights\)"
    ):
        qwenvl.load(checkpoint_copy)


def test_an_image_is_not_a_model(tmp_path):
    (tmp_path / "odd.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    with pytest.raises(ModelFileError, match=r"odd\.png: not a model: expected .*a \.gguf file or a hub id"):
        qwenvl.load(tmp_path / "odd.png")


def test_config_not_json(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text("{ not json")
    with pytest.raises(ModelFileError, match=r"config\.json: invalid JSON"):
        qwenvl.load(checkpoint_copy)


def test_unknown_architecture(checkpoint_copy):
    _edit_config(checkpoint_copy, architectures=["GemmaForCausalLM"], model_type="gemma")
    with pytest.raises(ModelFileError, match=r"config\.json: unsupported architecture 'GemmaForCausalLM'"):
        qwenvl.load(checkpoint_copy)


def test_missing_config_field(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    del config["hidden_size"]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="missing field 'hidden_size'"):
        qwenvl.load(checkpoint_copy)


def test_missing_tensor(checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, checkpoint_copy / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        qwenvl.load(checkpoint_copy)


def test_tensor_of_wrong_shape(checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, 64)
    save_file(weights, checkpoint_copy / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[7, 64\]"):
        qwenvl.load(checkpoint_copy)


def test_truncated_safetensors(checkpoint_copy):
    path = checkpoint_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match=r"model\.safetensors: unreadable safetensors file"):
        qwenvl.load(checkpoint_copy)


def test_no_weights(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="no model.safetensors"):
        qwenvl.load(checkpoint_copy)


def test_sharded_checkpoint_with_missing_shard(checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    (checkpoint_copy / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, checkpoint_copy / file)
    index = {"weight_map": {n: f for f, shard_names in shards.items() for n in shard_names}}
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    model = qwenvl.load(checkpoint_copy, dtype="float32")  # sharded loads
    assert model.chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=3).completion_tokens >= 1
    (checkpoint_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFileError, match="model-00002-of-00002.safetensors: shard listed"):
        qwenvl.load(checkpoint_copy)


def test_pickle_checkpoint_loads_weights_only(checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    (checkpoint_copy / "model.safetensors").unlink()
    torch.save(weights, checkpoint_copy / "pytorch_model.bin")
    model = qwenvl.load(checkpoint_copy, dtype="float32")
    assert torch.equal(model.text_model.norm.weight, weights["model.norm.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, checkpoint_copy / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="weights-only"):
        qwenvl.load(checkpoint_copy)


def test_missing_tokenizer(checkpoint_copy):
    (checkpoint_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        qwenvl.load(checkpoint_copy)


def test_hub_id_offline_and_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelFileError, match="Qwen/Qwen2-VL-2B-Instruct: not in the local Hugging Face cache"):
        qwenvl.load("Qwen/Qwen2-VL-2B-Instruct")


def test_request_errors(make_qwen2):
    model = qwenvl.load(make_qwen2("default"), dtype="float32")
    with pytest.raises(RequestError, match="max_tokens must be at least 1"):
        model.chat([{"role": "user", "content": "hi"}], max_tokens=0)
    with pytest.raises(RequestError, match="empty prompt"):
        list(model.generate([], max_tokens=4))
    with pytest.raises(RequestError):
        model.chat([{"role": "wizard", "content": "hi"}])
    small = qwenvl.load(make_qwen2("default"), dtype="float32", context=8)
    with pytest.raises(RequestError, match="the context holds 8"):
        small.chat([{"role": "user", "content": "a long enough prompt to overflow eight tokens"}])


def test_context_caps_generation(make_qwen2):
    model = qwenvl.load(make_qwen2("default"), dtype="float32", context=40)
    prompt = model.prepare([{"role": "user", "content": "hi"}])
    result = model.chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=500)
    assert result.prompt_tokens + result.completion_tokens <= 40
    assert len(prompt.input_ids) == result.prompt_tokens


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "{model}", "-p", "   "], "empty prompt"),
        (["run", "{model}", "-p", "hi", "--max-tokens", "0"], "max_tokens must be at least 1"),
        (["run", "{model}", "-p", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["run", "{missing}", "-p", "hi"], "no such model directory"),
        (["run", "{model}", "-p", "hi", "--image", "{missing}.png"], "text-only"),
        (["run", "{model}", "-p", "hi", "--mmproj", "x.gguf"], "--mmproj goes with a GGUF model"),
        (["tokenize", "{missing}", "hello"], "no such model directory"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(make_qwen2, tmp_path, capsys, argv, message):
    values = {"model": str(make_qwen2("default")), "missing": str(tmp_path / "missing")}
    code = cli_main([arg.format(**values) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("qwenvl: error:") and message in err
    assert err.count("\n") == 1, err


def test_error_hierarchy():
    assert issubclass(ModelFileError, QwenVLError) and issubclass(RequestError, QwenVLError)
