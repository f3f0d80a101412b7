"""The accuracy guard of the fast paths: a GGUF run with its weights kept quantized (the default)
agrees with the plain fp32 path on the same weights (every weight dequantized once, fp32 math).

- fp32 activations through the block kernels: the same weights exactly, so logits agree to fp32
  rounding and greedy tokens are identical.
- bf16 activations (the default on this CPU): logits cosine ≥ 0.999 against fp32.
- the re-quantizing torch kernels (int8, int4): logits cosine ≥ 0.999.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType as Q
from gguf_fixtures import write_tiny_gguf

import qwenvl
from qwenvl.quant.linear import ConcatLinear, QuantEmbedding, QuantLinear
from qwenvl.quant.model import pack_prefill_weights

# hidden and ffn multiples of 256 so that the K-quants apply to every matrix; the tiny vocabulary
# of gguf_fixtures keeps files small. Embeddings and norms stay F32 / Q8_0 as in published files.
SHAPE = dict(hidden=256, ffn=512, std=0.02)
TYPES = ["q8_0", "q5_0", "q4_0", "q4_1", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "f16", "bf16"]
PROMPTS = [[5, 17, 3, 40, 2, 9, 31, 12], [60, 8, 44, 1, 23, 23, 7, 50, 11, 3]]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """gguf_files(type, tied=False) → a tiny GGUF whose projections are in that type (made once)."""
    made: dict[tuple[str, bool], Path] = {}

    def get(kind: str, tied: bool = False) -> Path:
        if (kind, tied) not in made:
            qtype = Q[kind.upper()]

            def types(name: str) -> Q:
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    return Q.F32
                return Q.Q8_0 if name == "output.weight" and kind.startswith("q") else qtype

            path = tmp_path_factory.mktemp("quant-model") / f"tiny-{kind}-{'tied' if tied else 'untied'}.gguf"
            write_tiny_gguf(path, tied=tied, types=types, **SHAPE)
            made[kind, tied] = path
        return made[kind, tied]

    return get


def prompt_logits(model: qwenvl.api.Model, ids: list[int]) -> torch.Tensor:
    text = model.text_model
    positions = torch.arange(len(ids)).expand(3, 1, -1)
    with torch.inference_mode():
        return text.logits(text(text.embed(torch.tensor([ids])), positions))[0].float()


def greedy(model: qwenvl.api.Model, ids: list[int], n: int = 16) -> list[int]:
    generation = model.generate(ids, temperature=0, max_tokens=n, ignore_eos=True)
    for _ in generation:
        pass
    return generation.result.token_ids


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("kind", TYPES)
def test_fp32_kernels_equal_the_dequantized_model(native_isa, gguf_files, kind):
    path = gguf_files(kind)
    plain = qwenvl.load(path, dtype="float32", kernel="dense")
    fast = qwenvl.load(path, dtype="float32")
    assert any(isinstance(m, QuantLinear) and m.kernel == "blocks" for m in fast.text_model.modules())
    for ids in PROMPTS:
        want, got = prompt_logits(plain, ids), prompt_logits(fast, ids)
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
        assert greedy(fast, ids) == greedy(plain, ids)


@pytest.mark.parametrize("kind", ["q8_0", "q5_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("exact_prefill", [False, True])
def test_bf16_kernels_stay_close_to_fp32(native_isa, gguf_files, kind, exact_prefill):
    path = gguf_files(kind)
    plain = qwenvl.load(path, dtype="float32", kernel="dense")
    fast = qwenvl.load(path, dtype="bfloat16", exact_prefill=exact_prefill)
    assert fast.dtype == torch.bfloat16
    for ids in PROMPTS:
        assert cosine(prompt_logits(fast, ids), prompt_logits(plain, ids)) >= 0.999
        # one decode step (the exact block GEMV) after the prompt
        want = _next_logits(plain, ids)
        assert cosine(_next_logits(fast, ids), want) >= 0.999


def _next_logits(model: qwenvl.api.Model, ids: list[int]) -> torch.Tensor:
    """Logits of a one-token decode step after prefilling ``ids`` (what generation runs per token)."""
    from qwenvl.engine.generate import decode_step, new_request, prefill
    from qwenvl.engine.prompt import Prompt
    from qwenvl.engine.sampler import sampling_params

    params = sampling_params(model.generation_config, temperature=0, max_tokens=4)
    request = new_request(
        model.text_model, model.tokenizer, Prompt.text_only(ids), params, [0], model.context, pool=model.kv_pool
    )
    try:
        with torch.inference_mode():
            prefill(model.text_model, request)
            request.output_ids.append(ids[0])
            return decode_step(model.text_model, request, ids[0]).float()
    finally:
        request.release_cache()


@pytest.mark.parametrize(("kind", "kernel"), [("q8_0", "int8"), ("q4_0", "int4"), ("q4_1", "int4")])
def test_requantizing_torch_kernels_stay_close(gguf_files, kind, kernel):
    path = gguf_files(kind)
    plain = qwenvl.load(path, dtype="float32", kernel="dense")
    fast = qwenvl.load(path, dtype="bfloat16", kernel=kernel)
    kernels = {m.kernel for m in fast.text_model.modules() if isinstance(m, QuantLinear)}
    assert kernel in kernels
    for ids in PROMPTS:
        assert cosine(prompt_logits(fast, ids), prompt_logits(plain, ids)) >= 0.999


def test_weights_stay_in_their_file_format(gguf_files):
    path = gguf_files("q5_0")
    model = qwenvl.load(path, dtype="bfloat16", exact_prefill=True)
    text = model.text_model
    assert isinstance(text.embed_tokens, QuantEmbedding)
    linears = [m for m in text.modules() if isinstance(m, QuantLinear)]
    held = sum(m.weight_bytes for m in linears) + text.embed_tokens.blocks.numel()
    assert held <= path.stat().st_size  # nothing dequantized, nothing held twice
    assert not any(isinstance(m, torch.nn.Linear) for m in text.modules())
    assert all(m.kernel == "blocks" and m.exact for m in linears)


def test_tied_embedding_shares_its_blocks_with_the_head(gguf_files):
    path = gguf_files("q8_0", tied=True)
    model = qwenvl.load(path, dtype="float32")
    text = model.text_model
    head = text.lm_head.parts[0] if isinstance(text.lm_head, ConcatLinear) else text.lm_head
    assert head.blocks.data_ptr() == text.embed_tokens.blocks.data_ptr()
    plain = qwenvl.load(path, dtype="float32", kernel="dense")
    assert greedy(model, PROMPTS[0]) == greedy(plain, PROMPTS[0])


def test_unknown_kernel_is_a_clear_error(gguf_files):
    with pytest.raises(qwenvl.errors.QwenVLError, match="unknown kernel"):
        qwenvl.load(gguf_files("q8_0"), kernel="fastest")


@pytest.mark.parametrize("kind", ["q5_0", "q4_k"])
def test_packed_prefill_weights_change_nothing_but_speed(gguf_files, kind):
    """Packing the layers' prompt weights (the server's --prefill-weights) gives bit-identical prompt
    logits and greedy answers; a budget too small for all of them packs none."""
    model = qwenvl.load(gguf_files(kind), dtype="bfloat16")
    ids = PROMPTS[1] * 3  # 30 tokens: the prompt takes the GEMM path
    logits, tokens = prompt_logits(model, ids), greedy(model, ids)
    layers = [m for m in model.text_model.layers.modules() if hasattr(m, "packed_bytes")]
    needed = sum(m.out_features * m.in_features * 2 for m in layers)
    assert pack_prefill_weights(model.text_model, needed - 1) == 0
    assert all(m.packed_bytes == 0 for m in layers)
    packed = pack_prefill_weights(model.text_model, needed)
    if packed == 0:
        pytest.skip("this torch has no oneDNN packed linear")
    assert packed == needed and all(m.packed_bytes for m in layers)
    assert model.text_model.lm_head.packed_bytes == 0
    assert torch.equal(prompt_logits(model, ids), logits)
    assert greedy(model, ids) == tokens


def test_serve_prefill_weights_choices(gguf_files):
    from qwenvl.cli import _pack_prefill_weights, build_parser

    args = build_parser().parse_args(["serve", "m.gguf"])
    assert args.prefill_weights == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m.gguf", "--prefill-weights", "dense"])
    model = qwenvl.load(gguf_files("q8_0"), dtype="bfloat16")
    layers = [m for m in model.text_model.layers.modules() if hasattr(m, "packed_bytes")]
    assert _pack_prefill_weights(model, "blocks") == "" and not any(m.packed_bytes for m in layers)
    note = _pack_prefill_weights(model, "packed")
    if not any(m.packed_bytes for m in layers):
        pytest.skip("this torch has no oneDNN packed linear")
    assert note.startswith(", prompt weights packed (") and note.endswith(" MB)")
