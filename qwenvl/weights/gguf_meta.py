"""A text GGUF's metadata per architecture, as llama.cpp's ``convert_hf_to_gguf.py`` writes it:
general.*, the architecture's hyperparameters and the vocabulary (tokenizer.ggml.*).

- qwen2 / qwen2vl: the checkpoint's tokenizer.json (byte-level BPE, pre-tokenizer "qwen2");
- qwen (Qwen v1, ``QwenModel``): hparams from config.json's own names (feed_forward_length is its
  intermediate_size, twice the MLP width); the vocabulary from ``qwen.tiktoken`` (its ranks as byte-level
  tokens, the merges derived as llama.cpp derives them, the special tokens CONTROL, the rest of the
  embedding "[PADn]"), bos = eos = unk = ``<|endoftext|>`` unless the checkpoint names others.
  Beyond llama.cpp's converter, qwenvl writes the Qwen chat template (the checkpoints carry none:
  chat.fallback_template) and, when the model uses them, ``qwen.seq_length``, ``qwen.use_dynamic_ntk``
  and ``qwen.use_logn_attn`` (llama.cpp implements neither, and ignores the keys; below seq_length
  neither changes anything);
- llama (``LlamaModel``): hparams as llama.cpp's TextModel + LlamaModel write them; the vocabulary from
  the SentencePiece ``tokenizer.model`` (``_create_vocab_sentencepiece``: pieces, scores and types, the
  added tokens of added_tokens.json USER_DEFINED, those of tokenizer_config.json's
  added_tokens_decoder CONTROL when special or special-looking, the rest of the embedding "[PADn]"),
  tokenizer.ggml.model "llama", pre "default", special ids, add_bos / add_eos and the chat template by
  gguf.SpecialVocab. The q and k weights are written with their rows interleaved per head
  (``layout.permute_rows``: llama.cpp's ``permute``), as llama.cpp's rope expects.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any, Protocol

import gguf
from gguf.constants import GGML_QUANT_VERSION, LlamaFileType, TokenType

from ..config import ModelConfig
from ..errors import ModelFileError
from ..tokenizer import QWEN2_PRETOKENIZE_REGEX


class TextSource(Protocol):
    """What the metadata is made from (an HF checkpoint, or a qwen.cpp file and its tiktoken)."""

    directory: Path | None  # the checkpoint directory (README, config and tokenizer files), if any
    raw_config: dict[str, Any]
    config: ModelConfig
    vocab_file: Path  # tokenizer.json, qwen.tiktoken or tokenizer.model

    @property
    def name(self) -> str: ...


# llama.cpp's converter names the tokenizer "qwen2" when these hash its probe text's token ids
QWEN2_TOKENIZER_HASHES = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c",  # Qwen3-Embedding
}
TOKENIZER_PROBE = (  # llama.cpp's chktxt (convert_hf_to_gguf.py get_vocab_base_pre)
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


def general_metadata(writer: gguf.GGUFWriter, directory: Path | None, kind: str, name: str) -> None:
    """general.type / name / size_label ... as llama.cpp's converter writes them (gguf.Metadata);
    ``directory``: the checkpoint's, whose README / config it reads (None: a single file's)."""
    total, shared, expert, experts = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, directory, None, total)
    if metadata.name is None:
        metadata.name = name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, experts)
    writer.add_type(kind)
    metadata.set_gguf_meta_model(writer)


def text_metadata(writer: gguf.GGUFWriter, source: TextSource, file_type: LlamaFileType) -> None:
    """Everything but the tensors: general.*, the architecture's hparams, tokenizer.ggml.*."""
    general_metadata(writer, source.directory, gguf.GGUFType.MODEL, source.name)
    HPARAMS[source.config.arch](writer, source)
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    VOCABULARIES[source.config.arch](writer, source)


def qwen2_hparams(writer: gguf.GGUFWriter, source: TextSource) -> None:
    text = source.config.text
    section = source.raw_config.get("text_config") or source.raw_config
    writer.add_block_count(text.num_hidden_layers)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    if text.mrope_section is not None:
        writer.add_rope_dimension_sections((list(text.mrope_section) + [0] * 4)[:4])
    writer.add_rope_freq_base(text.rope_theta)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    if section.get("head_dim") is not None:
        writer.add_key_length(text.head_dim)
        writer.add_value_length(text.head_dim)


def qwen2_vocabulary(writer: gguf.GGUFWriter, source: TextSource) -> None:
    """tokenizer.ggml.*: what llama.cpp's converter writes for a Qwen2 byte-level BPE tokenizer."""
    tokens, types = vocab_tokens(source.directory, source.config.text.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(source.directory, load_merges=False, n_vocab=len(tokens))
    writer.add_token_merges(bpe_merges(source.directory / "tokenizer.json"))
    special.add_to_gguf(writer, quiet=True)


def bpe_merges(json_file: Path) -> list[str]:
    """tokenizer.json's merges as "a b" strings; a space inside a part is written as U+0120 + 256 = 'Ġ'
    shifted (chr(288)), as gguf.SpecialVocab does."""
    try:
        merges = json.loads(json_file.read_text(encoding="utf-8"))["model"]["merges"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{json_file}: no BPE merges ({exc})") from None
    if not merges or isinstance(merges[0], str):
        return list(merges)
    if any(" " in part for pair in merges for part in pair):
        return [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in merges]
    return [f"{left} {right}" for left, right in merges]


def vocab_tokens(directory: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types by id, padded to the embedding's rows with UNUSED "[PADn]" tokens.

    Added tokens are CONTROL when special (or shaped like "<|…|>"), else USER_DEFINED: llama.cpp's rule.
    """
    import tokenizers

    json_file = directory / "tokenizer.json"
    try:
        backend = tokenizers.Tokenizer.from_file(str(json_file))
    except Exception as exc:  # tokenizers raises plain Exception
        raise ModelFileError(f"{json_file}: not a valid tokenizer.json ({exc})") from None
    _check_qwen2_pretokenizer(backend, json_file)
    added = backend.get_added_tokens_decoder()
    by_id = {token_id: token for token, token_id in backend.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= vocab_size:
        raise ModelFileError(f"{json_file}: token id {max(by_id)} does not fit the {vocab_size}-row embedding")
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(TokenType.UNUSED)
        elif token_id in added:
            content = added[token_id]
            if not content.normalized:  # llama.cpp expects added tokens pre-normalized
                token = backend.decode(backend.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            special = content.special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token if special else token.replace("\u2581", " "))
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _check_qwen2_pretokenizer(backend: Any, json_file: Path) -> None:
    ids = backend.encode(TOKENIZER_PROBE, add_special_tokens=False).ids
    if sha256(str(ids).encode()).hexdigest() in QWEN2_TOKENIZER_HASHES:
        return
    if QWEN2_PRETOKENIZE_REGEX in backend.to_str():  # a fine-tuned vocabulary with Qwen2's splitting
        return
    raise ModelFileError(f"{json_file}: not a Qwen2 byte-level BPE tokenizer (its pre-tokenizer is not 'qwen2')")


# ----------------------------------------------------------------------------------------------
# Qwen (v1)

QWEN_EXTRA_KEYS = ("qwen.seq_length", "qwen.use_dynamic_ntk", "qwen.use_logn_attn")


def qwen_hparams(writer: gguf.GGUFWriter, source: TextSource) -> None:
    """llama.cpp's QwenModel.set_gguf_parameters, then qwenvl's three keys when they matter."""
    text = source.config.text
    writer.add_context_length(text.max_position_embeddings)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_embedding_length(text.hidden_size)
    writer.add_feed_forward_length(2 * text.intermediate_size)
    writer.add_rope_freq_base(text.rope_theta)
    writer.add_rope_dimension_count(text.head_dim)
    writer.add_head_count(text.num_attention_heads)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    if text.use_dynamic_ntk or text.use_logn_attn:
        writer.add_uint32("qwen.seq_length", text.seq_length)
        writer.add_bool("qwen.use_dynamic_ntk", text.use_dynamic_ntk)
        writer.add_bool("qwen.use_logn_attn", text.use_logn_attn)


def qwen_vocabulary(writer: gguf.GGUFWriter, source: TextSource) -> None:
    """llama.cpp's ``_set_vocab_qwen``, from qwen.tiktoken (and the chat template qwenvl uses)."""
    from ..chat import fallback_template
    from ..vocab import QWEN_FIRST_SPECIAL_ID, QWEN_SPECIAL_TOKENS, tiktoken_tokenizer_json

    document = json.loads(tiktoken_tokenizer_json(source.vocab_file))
    vocab_size = source.config.text.vocab_size
    by_id = {token_id: token for token, token_id in document["model"]["vocab"].items()}
    specials = {QWEN_FIRST_SPECIAL_ID + i: token for i, token in enumerate(QWEN_SPECIAL_TOKENS)}
    if max(specials) >= vocab_size:
        raise ModelFileError(f"{source.vocab_file}: its special tokens do not fit a {vocab_size}-row embedding")
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id in specials:
            tokens.append(specials[token_id])
            types.append(TokenType.CONTROL)
        elif token_id in by_id:
            tokens.append(by_id[token_id])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{token_id}]")
            types.append(TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_qwen_pre(document, source.vocab_file))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    merges = [" ".join(pair) for pair in document["model"]["merges"]]
    endoftext = QWEN_FIRST_SPECIAL_ID
    if source.directory is None:  # a qwen.cpp file: nothing but the vocabulary to go by
        writer.add_token_merges(merges)
        for kind in ("bos", "eos", "unk"):
            getattr(writer, f"add_{kind}_token_id")(endoftext)
        writer.add_chat_template(fallback_template("qwen"))
        return
    special = gguf.SpecialVocab(source.directory, load_merges=False)
    special.merges = merges
    if not special.special_token_ids:
        special._set_special_token("bos", endoftext)
        special._set_special_token("eos", endoftext)
    special._set_special_token("unk", endoftext)
    if special.chat_template is None:
        special.chat_template = fallback_template("qwen")
    special.add_to_gguf(writer, quiet=True)


def _qwen_pre(document: dict[str, Any], where: Path) -> str:
    """The pre-tokenizer name llama.cpp gives this vocabulary (by the hash of its probe's token ids)."""
    from ..tokenizer import Tokenizer

    ids = Tokenizer.from_json(json.dumps(document)).encode(TOKENIZER_PROBE, parse_special=False)
    if sha256(str(ids).encode()).hexdigest() not in QWEN2_TOKENIZER_HASHES:
        raise ModelFileError(f"{where}: not Qwen's tiktoken vocabulary (llama.cpp would not know its pre-tokenizer)")
    return "qwen2"


# ----------------------------------------------------------------------------------------------
# Llama


def llama_hparams(writer: gguf.GGUFWriter, source: TextSource) -> None:
    text = source.config.text
    writer.add_block_count(text.num_hidden_layers)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    writer.add_rope_freq_base(text.rope_theta)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    if source.raw_config.get("head_dim") is not None:
        writer.add_key_length(text.head_dim)
        writer.add_value_length(text.head_dim)
    writer.add_vocab_size(text.vocab_size)
    writer.add_rope_dimension_count(text.head_dim)


def _looks_special(token: str) -> bool:
    """llama.cpp's ``does_token_look_special``."""
    if token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]"):
        return True
    pairs = (("<|", "|>"), ("<｜", "｜>"), ("<unused", ">"))
    return any(token.startswith(a) and token.endswith(b) for a, b in pairs)


def llama_vocabulary(writer: gguf.GGUFWriter, source: TextSource) -> None:
    """llama.cpp's ``_set_vocab_sentencepiece``."""
    from ..tokenizer import _read_json
    from ..vocab import CONTROL, UNUSED, USER_DEFINED, read_sentencepiece

    vocab = read_sentencepiece(source.vocab_file)
    size = source.config.text.vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores, types = [-10000.0] * size, [UNUSED] * size
    for i, (piece, score, kind) in enumerate(zip(vocab.pieces[:size], vocab.scores, vocab.types)):
        tokens[i], scores[i], types[i] = piece, score, kind
    directory = source.vocab_file.parent
    added_file, config_file = directory / "added_tokens.json", directory / "tokenizer_config.json"
    for token, token_id in (_read_json(added_file) if added_file.is_file() else {}).items():
        if isinstance(token_id, int) and 0 <= token_id < size:
            tokens[token_id], scores[token_id], types[token_id] = token, -1000.0, USER_DEFINED
    decoder = (_read_json(config_file) if config_file.is_file() else {}).get("added_tokens_decoder") or {}
    for key, data in decoder.items():
        token_id, token = int(key), data["content"]
        if token_id >= size:
            continue
        if data.get("special") or _looks_special(token):
            types[token_id] = CONTROL
        else:
            token, types[token_id] = token.replace("\u2581", " "), USER_DEFINED
        tokens[token_id], scores[token_id] = token, -1000.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(directory, n_vocab=len(tokens))
    if not special.special_token_ids:  # no config.json (Meta's layout): the model's own ids
        for kind, token_id in (("bos", vocab.bos_id), ("eos", vocab.eos_id), ("unk", vocab.unk_id)):
            if 0 <= token_id < size:
                special._set_special_token(kind, token_id)
    special.add_to_gguf(writer, quiet=True)


HPARAMS = {
    "qwen2": qwen2_hparams,
    "qwen2_vl": qwen2_hparams,
    "qwen2_5_vl": qwen2_hparams,
    "qwen": qwen_hparams,
    "llama": llama_hparams,
}
VOCABULARIES = {
    "qwen2": qwen2_vocabulary,
    "qwen2_vl": qwen2_vocabulary,
    "qwen2_5_vl": qwen2_vocabulary,
    "qwen": qwen_vocabulary,
    "llama": llama_vocabulary,
}


__all__ = ["TextSource", "general_metadata", "text_metadata", "vocab_tokens"]
