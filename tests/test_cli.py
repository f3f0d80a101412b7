"""The command line: run (streamed and --json), tokenize, chat REPL."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import qwenvl
from qwenvl import cli
from qwenvl.cli import main as cli_main

PROMPTS = ["Write a haiku about the sea.", "2 + 2 = ?", "Translate 'cat' to French."]


def hf_chat_greedy(directory, prompt, max_new_tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.inference_mode():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
    return ids.shape[1], out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_run_json_greedy_equals_transformers(make_qwen2, capsys, prompt):
    directory = make_qwen2("default")
    prompt_tokens, expected = hf_chat_greedy(directory, prompt, 32)
    code = cli_main(
        [
            "run",
            str(directory),
            "-p",
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            "32",
            "--json",
            "--dtype",
            "float32",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == expected
    assert result["prompt_tokens"] == prompt_tokens
    assert result["completion_tokens"] == len(expected)
    assert result["finish_reason"] in ("stop", "length")
    assert set(result["timings"]) >= {"load_s", "prefill_s", "decode_s", "prefill_tok_s", "decode_tok_s"}


def test_run_streams_the_same_text_as_json(make_qwen2, capsys):
    directory = str(make_qwen2("default"))
    common = ["run", directory, "-p", PROMPTS[0], "--temperature", "0", "--max-tokens", "20", "--dtype", "float32"]
    assert cli_main(common) == 0
    streamed = capsys.readouterr().out
    assert cli_main(common + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert streamed == result["text"] + "\n"


def test_run_stop_string_and_seed(make_qwen2, capsys):
    directory = str(make_qwen2("default"))
    base = [
        "run",
        directory,
        "-p",
        PROMPTS[1],
        "--max-tokens",
        "24",
        "--json",
        "--dtype",
        "float32",
        "--temperature",
        "1.5",
    ]
    cli_main(base + ["--seed", "3"])
    first = json.loads(capsys.readouterr().out)
    cli_main(base + ["--seed", "3"])
    assert json.loads(capsys.readouterr().out)["tokens"] == first["tokens"]
    text = first["text"]
    if len(text) > 4:
        stop = text[2:4]
        cli_main(base + ["--seed", "3", "--stop", stop])
        stopped = json.loads(capsys.readouterr().out)
        assert stopped["finish_reason"] == "stop" and stop not in stopped["text"]
        assert text.startswith(stopped["text"])


def test_tokenize(make_qwen2, capsys):
    directory = str(make_qwen2("default"))
    model = qwenvl.load(directory, dtype="float32")
    text = "<|im_start|>user\nHello 世界 🌍"
    assert cli_main(["tokenize", directory, text, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ids"] == model.tokenizer.encode(text)
    assert result["ids"][0] == 151644
    assert len(result["pieces"]) == len(result["ids"])
    assert "".join(result["pieces"]).startswith("<|im_start|>user\nHello 世界")  # the emoji's bytes span tokens
    assert model.tokenizer.decode(result["ids"]) == text
    assert cli_main(["tokenize", directory, text, "--json", "--no-parse-special"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert 151644 not in plain["ids"] and model.tokenizer.decode(plain["ids"]) == text
    assert cli_main(["tokenize", directory, "Hi there"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{i:6d} -> {p!r}"
        for i, p in zip(model.tokenizer.encode("Hi there"), model.tokenizer.pieces(model.tokenizer.encode("Hi there")))
    ]


class RecordingModel:
    """Wraps a model to record each conversation the REPL sends; can raise Ctrl-C mid-answer."""

    def __init__(self, model, interrupt_turn=None):
        self.model, self.calls, self.interrupt_turn = model, [], interrupt_turn
        self.source, self.kv_pool, self.generations = model.source, model.kv_pool, []

    def __getattr__(self, name):  # vision_model, no_vision_message, …: the model's
        return getattr(self.model, name)

    def stream(self, messages, **options):
        self.calls.append([dict(m) for m in messages])
        generation = self.model.stream(messages, **options)
        self.generations.append(generation)
        if len(self.calls) == self.interrupt_turn:

            def interrupted():
                for index, piece in enumerate(generation):
                    if index == 2:
                        raise KeyboardInterrupt
                    yield piece

            return interrupted()
        return generation


def _run_repl(monkeypatch, model, lines, extra=()):
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(cli, "_load", lambda args: (model, 0.0))
    return cli_main(["chat", "--temperature", "0", "--max-tokens", "8", *extra])


def test_chat_repl_keeps_history_and_resets(make_qwen2, monkeypatch, capsys):
    model = RecordingModel(qwenvl.load(make_qwen2("default"), dtype="float32"))
    code = _run_repl(
        monkeypatch,
        model,
        ["Hello", "And again?", "/reset", "Fresh start", "/quit", "never read"],
        extra=["--system", "Be brief."],
    )
    assert code == 0
    first, second, third = model.calls
    assert [m["role"] for m in first] == ["system", "user"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[1]["content"] == "Hello" and second[3]["content"] == "And again?"
    assert [m["role"] for m in third] == ["system", "user"] and third[1]["content"] == "Fresh start"
    assert "conversation cleared" in capsys.readouterr().err


def test_chat_repl_turn_reuses_the_previous_turn(make_qwen2, monkeypatch, capsys):
    """A turn prefills only what is new: the previous turn's prompt is in the KV cache."""
    model = RecordingModel(qwenvl.load(make_qwen2("default"), dtype="float32"))
    system = "You answer in one short sentence, always politely and without any preamble at all."
    assert _run_repl(monkeypatch, model, ["Hello there, who are you?", "And again?"], extra=["--system", system]) == 0
    first, second = (generation.result for generation in model.generations)
    assert first.cached_tokens == 0 and second.cached_tokens >= first.prompt_tokens - 16 > 0
    assert "KV cache" in capsys.readouterr().err and not any(model.kv_pool.refs)


def test_chat_repl_ctrl_c_stops_the_answer_not_the_program(make_qwen2, monkeypatch, capsys):
    model = RecordingModel(qwenvl.load(make_qwen2("default"), dtype="float32"), interrupt_turn=1)
    code = _run_repl(monkeypatch, model, ["Tell me a story", "Continue"])
    assert code == 0 and len(model.calls) == 2
    assert "[stopped]" in capsys.readouterr().out
    assert [m["role"] for m in model.calls[1]] == ["user", "assistant", "user"]


def test_chat_repl_image_attaches_to_next_message(make_vl, monkeypatch, tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (60, 60), (255, 0, 0)).save(path)
    model = RecordingModel(
        qwenvl.load(make_vl("qwen2_vl-cli", arch="qwen2_vl", mrope_section=[2, 3, 3]), dtype="float32")
    )
    assert _run_repl(monkeypatch, model, [f"/image {path}", "What colour?", "And now?"]) == 0
    first, second = model.calls
    assert first[-1]["content"][0] == {"type": "image", "image": str(path)}
    assert second[-1]["content"] == "And now?" and second[0]["content"][0]["type"] == "image"


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "qwenvl", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"qwenvl {qwenvl.__version__}"
    bad = subprocess.run([sys.executable, "-m", "qwenvl", "run"], capture_output=True, text=True)
    assert bad.returncode == 2 and "required: -p/--prompt" in bad.stderr
