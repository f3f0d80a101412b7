"""Qwen (v1) checkpoints (QWenLMHeadModel): tokenizer from qwen.tiktoken against tiktoken, the model
against transformers' Qwen2ForCausalLM with the mapped weights (the same math below seq_length), and
dynamic NTK + logn attention past seq_length against that model with Qwen's NTK-scaled base and logn
factors (modeling_qwen.py's formulas), the engine's batched paths included.
"""

from __future__ import annotations

import json
import math
import unicodedata

import gguf
import pytest
import tiktoken
import torch
from checkpoints import qwen2_kwargs_for, qwen2_state_from_v1
from gguf.constants import MODEL_ARCH, TokenType
from safetensors.torch import load_file
from tokenizer_fixtures import QWEN2_PATTERN, QWEN_TIKTOKEN, qwen_ranks
from transformers import Qwen2Config, Qwen2ForCausalLM

import qwenvl
from qwenvl.cli import main as cli_main
from qwenvl.convert import convert_hf
from qwenvl.engine.scheduler import BatchEngine
from qwenvl.errors import ModelFileError
from qwenvl.models.rope import dynamic_ntk_alpha, logn_scale
from qwenvl.tokenizer import Tokenizer
from qwenvl.vocab import QWEN_FIRST_SPECIAL_ID, QWEN_SPECIAL_TOKENS, read_tiktoken
from qwenvl.weights.gguf import open_gguf_file

SEQ_LENGTH = 64
TEXTS = [
    "Hello, world! How are you today?",
    "你好，世界。今天天气怎么样？",
    "def f(x):\n    return x ** 2  # squares\n\n\n",
    "emoji 🚀🦙 mixed 😶‍🌫️ and numbers 1234567 3.14159",
    "   leading and trailing spaces   ",
    "special <|im_start|>user\nhi<|im_end|> and <|extra_0|><|extra_204|><|endoftext|>",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea?",
    "Ünïcödé: café naïve, ＡＢＣ full width, e\u0301 combining",
]


@pytest.fixture(scope="module")
def qwen_dir(make_qwen_v1):
    return make_qwen_v1("seq64", seq_length=SEQ_LENGTH)


@pytest.fixture(scope="module")
def model(qwen_dir):
    return qwenvl.load(qwen_dir, dtype="float32")


def reference(qwen_dir, alpha: float = 1.0) -> Qwen2ForCausalLM:
    """transformers' Qwen2 with the checkpoint's weights; ``alpha``: Qwen's NTK factor on the base."""
    config = json.loads((qwen_dir / "config.json").read_text())
    dim = config["kv_channels"]
    theta = config["rotary_emb_base"] * alpha ** (dim / (dim - 2)) if alpha != 1 else None
    hf = Qwen2ForCausalLM(Qwen2Config(**qwen2_kwargs_for(config, theta))).eval()
    state = qwen2_state_from_v1(load_file(str(qwen_dir / "model.safetensors")), config["num_hidden_layers"])
    hf.load_state_dict(state, strict=True)
    return hf


def with_logn(hf: Qwen2ForCausalLM, seq_length: int) -> Qwen2ForCausalLM:
    """Qwen's logn attention on the reference: queries scaled by their position's factor (before the
    rotation, which is linear, so the same as after). Full-sequence forwards only (row = position)."""

    def scale(module, inputs, output):
        factors = logn_scale(torch.arange(output.shape[1]), seq_length)
        return output * factors[None, :, None]

    for layer in hf.model.layers:
        layer.self_attn.q_proj.register_forward_hook(scale)
    return hf


def hf_greedy(hf: Qwen2ForCausalLM, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation by full forwards (no cache), and the logits of the whole final sequence."""
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(torch.tensor([sequence])).logits[0]
            sequence.append(int(logits[-1].argmax()))
        return sequence[len(ids) :], hf(torch.tensor([sequence])).logits[0]


def our_logits(model, sequence: list[int]) -> torch.Tensor:
    text = model.text_model
    with torch.inference_mode():
        positions = torch.arange(len(sequence))[None, None, :].expand(3, 1, -1)
        alpha = text.rope_alpha(len(sequence))
        return text.logits(text(text.embed(torch.tensor([sequence])), positions, rope_alpha=alpha))[0]


def greedy(model, ids: list[int], steps: int) -> list[int]:
    generation = model.generate(ids, temperature=0, max_tokens=steps, ignore_eos=True)
    for _ in generation:
        pass
    return generation.result.token_ids


# ----------------------------------------------------------------------------------------------
# Tokenizer


def qwen_tiktoken() -> tiktoken.Encoding:
    specials = {token: QWEN_FIRST_SPECIAL_ID + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=qwen_ranks(), special_tokens=specials)


def test_tokenizer_encodes_as_tiktoken(qwen_dir):
    ours = Tokenizer.from_dir(qwen_dir)
    reference_encoding = qwen_tiktoken()
    assert ours.vocab_size == 151851  # 151643 ranks + 208 special tokens
    for text in TEXTS:
        text = unicodedata.normalize("NFC", text)  # QWenTokenizer.tokenize normalizes before tiktoken
        expected = reference_encoding.encode(text, allowed_special="all")
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == text
    plain = "<|im_start|> as text"
    assert ours.encode(plain, parse_special=False) == reference_encoding.encode(plain, disallowed_special=())
    assert ours.eos_token_id == ours.pad_token_id == 151643
    assert [ours.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|extra_204|>")] == [151644, 151645, 151850]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not base64!! 0\n", "line 1 is not 'base64-token rank'"),
        (b"QQ== 0\nQg== 1\n", "ranks are not 0"),
        (b"\x00\x01\x02garbage", "not a tiktoken vocabulary"),
    ],
)
def test_bad_tiktoken_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "qwen.tiktoken"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message) as error:
        read_tiktoken(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_real_tiktoken_reads(tmp_path):
    assert len(read_tiktoken(QWEN_TIKTOKEN)) == QWEN_FIRST_SPECIAL_ID


# ----------------------------------------------------------------------------------------------
# The model, below seq_length: Qwen2's math


def test_config(model):
    text = model.config.text
    assert model.config.arch == "qwen" and text.intermediate_size == 128 and text.num_key_value_heads == 4
    assert (text.qkv_bias, text.o_bias, text.mlp_bias) == (True, False, False)
    assert (text.seq_length, text.use_dynamic_ntk, text.use_logn_attn) == (SEQ_LENGTH, True, True)
    assert model.generation_config.eos_token_ids == (151643, 151645)


def test_chat_prompt_is_qwens_chatml(model):
    text = model.render([{"role": "user", "content": "Hi there"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    own = model.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and own.count("system") == 1


def test_logits_and_greedy_match_transformers_below_seq_length(model, qwen_dir):
    ids = model.prepare([{"role": "user", "content": "Write a haiku about tensors."}]).input_ids
    assert len(ids) + 24 <= SEQ_LENGTH
    expected, hf_logits = hf_greedy(reference(qwen_dir), ids, 24)
    assert greedy(model, ids, 24) == expected
    ours = our_logits(model, ids + expected)
    assert (ours - hf_logits).abs().max() <= 1e-4


# ----------------------------------------------------------------------------------------------
# Past seq_length: dynamic NTK and logn attention


def test_ntk_alpha_is_qwens():
    assert [dynamic_ntk_alpha(n, 48) for n in (1, 24, 48, 49, 96, 97, 192, 193)] == [1, 1, 1, 3, 3, 7, 7, 15]
    factors = logn_scale(torch.arange(50), 48)
    assert torch.equal(factors[:48], torch.ones(48))
    assert factors[48].item() == pytest.approx(math.log(49, 48)) and factors[49].item() == pytest.approx(
        math.log(50, 48)
    )


def test_long_prompt_matches_qwens_ntk_and_logn(model, qwen_dir):
    """A prompt past seq_length: the base is scaled by its alpha (3 here) for the whole request, and
    queries past seq_length by logn. Without either the answer differs."""
    ids = model.tokenizer.encode(" ".join(["tensors flow through the layers"] * 16))[: SEQ_LENGTH + 8]
    alpha = dynamic_ntk_alpha(len(ids), SEQ_LENGTH)
    assert alpha == 3
    expected, hf_logits = hf_greedy(with_logn(reference(qwen_dir, alpha), SEQ_LENGTH), ids, 24)
    assert greedy(model, ids, 24) == expected
    # our_logits takes alpha from the whole sequence: compare with the prompt's alpha instead
    text = model.text_model
    with torch.inference_mode():
        positions = torch.arange(len(ids) + 24)[None, None, :].expand(3, 1, -1)
        embeds = text.embed(torch.tensor([ids + expected]))
        ours = text.logits(text(embeds, positions, rope_alpha=alpha))[0]
    assert (ours - hf_logits).abs().max() <= 1e-4
    plain_hf = reference(qwen_dir)
    with torch.no_grad():
        plain = plain_hf(torch.tensor([ids + expected])).logits[0]
    assert (plain - hf_logits).abs().max() > 1e-2  # NTK and logn do change this answer


def test_short_prompt_growing_past_seq_length_keeps_alpha_1(model, qwen_dir):
    """Qwen fixes alpha at the prefill: a 56-token prompt keeps the base while decoding past 64 tokens,
    and logn applies to the positions beyond."""
    ids = model.tokenizer.encode(" ".join(["one two three four"] * 16))[:56]
    expected, _ = hf_greedy(with_logn(reference(qwen_dir), SEQ_LENGTH), ids, 24)
    assert greedy(model, ids, 24) == expected


def test_batched_engine_keeps_each_requests_alpha(model, monkeypatch):
    """Requests of different alphas prefilled together and decoded in one batch answer as alone."""
    long_ids = model.tokenizer.encode(" ".join(["alpha beta gamma delta"] * 50))[: 2 * SEQ_LENGTH + 5]
    prompts = [long_ids, long_ids[:20], long_ids[: SEQ_LENGTH + 3]]
    assert [model.text_model.rope_alpha(len(p)) for p in prompts] == [7.0, 1.0, 3.0]
    alone = [greedy(model, p, 10) for p in prompts]
    engine = BatchEngine(model, max_batch=4)
    monkeypatch.setattr(engine, "start", lambda: None)  # queue all three before the loop runs
    try:
        handles = [engine.submit(p, temperature=0, max_tokens=10, ignore_eos=True) for p in prompts]
        BatchEngine.start(engine)
        assert [h.result().token_ids for h in handles] == alone
    finally:
        engine.shutdown()


def test_missing_seq_length_is_refused(qwen_dir, tmp_path):
    config = json.loads((qwen_dir / "config.json").read_text())
    del config["seq_length"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    from qwenvl.config import model_config_from_hf

    with pytest.raises(ModelFileError, match="missing field 'seq_length'"):
        model_config_from_hf(config, where=str(tmp_path / "config.json"))
    config["seq_length"], config["rotary_pct"] = 2048, 0.5
    with pytest.raises(ModelFileError, match="rotary_pct 0.5 is not supported"):
        model_config_from_hf(config)


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp's "qwen" architecture)


@pytest.fixture(scope="module")
def qwen_gguf(qwen_dir, tmp_path_factory):
    return convert_hf(qwen_dir, tmp_path_factory.mktemp("qwen-gguf"), out_type="f32", progress=False)[0].path


def test_gguf_is_llama_cpps_qwen(qwen_gguf, qwen_dir):
    file = open_gguf_file(qwen_gguf)
    meta = file.metadata
    assert meta["general.architecture"] == "qwen"
    assert (meta["qwen.feed_forward_length"], meta["qwen.rope.dimension_count"]) == (256, 16)
    assert (meta["qwen.rope.freq_base"], meta["qwen.context_length"]) == (10000.0, 8192)
    assert (meta["qwen.seq_length"], meta["qwen.use_dynamic_ntk"], meta["qwen.use_logn_attn"]) == (64, True, True)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.bos_token_id"] == 151643
    assert "You are a helpful assistant." in meta["tokenizer.chat_template"]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == 151936 and tokens[151644] == "<|im_start|>" and types[151644] == TokenType.CONTROL
    assert tokens[151851] == "[PAD151851]" and types[151851] == TokenType.UNUSED
    llama = gguf.get_tensor_name_map(MODEL_ARCH.QWEN, 2)
    state = load_file(str(qwen_dir / "model.safetensors"))
    assert len(file.tensor_infos) == len(state)
    for name, tensor in state.items():
        gguf_name = llama.get_name(name, try_suffixes=(".weight", ".bias"))
        assert file.tensor_infos[gguf_name].shape == tuple(tensor.shape)
        assert torch.equal(file.tensor(gguf_name), tensor), name


def test_gguf_runs_as_the_checkpoint(model, qwen_gguf):
    ours = qwenvl.load(qwen_gguf, dtype="float32")
    assert ours.config.text == model.config.text
    assert ours.generation_config.eos_token_ids == (151643, 151645)
    messages = [{"role": "user", "content": "Write a haiku about tensors."}]
    assert ours.prepare(messages).input_ids == model.prepare(messages).input_ids
    ids = model.tokenizer.encode(" ".join(["tensors flow through the layers"] * 16))[: SEQ_LENGTH + 8]
    assert greedy(ours, ids, 24) == greedy(model, ids, 24)


def test_gguf_export_to_hf_runs_again(model, qwen_gguf, tmp_path):
    assert cli_main(["export", str(qwen_gguf), "-o", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["QWenLMHeadModel"] and config["intermediate_size"] == 256
    exported = qwenvl.load(tmp_path / "hf", dtype="float32")
    assert exported.config.text == model.config.text
    ids = model.prepare([{"role": "user", "content": "Hi"}]).input_ids
    assert exported.prepare([{"role": "user", "content": "Hi"}]).input_ids == ids
    assert greedy(exported, ids, 8) == greedy(model, ids, 8)
