"""Parity of qwenvl.models.vision with transformers' Qwen2-VL / Qwen2.5-VL vision encoders.

Each reference is a random tiny checkpoint built with transformers itself; our encoder gets its
weights from the full model's state_dict (real ``model.visual.`` names) and random patch rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from qwenvl.config import VisionConfig
from qwenvl.errors import ModelFileError
from qwenvl.models.vision import (
    Linear,
    SegmentPlan,
    VisionTransformer,
    vision_weights,
    weight_names,
    window_layout,
)

TINY_TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)


@dataclass(frozen=True)
class Case:
    variant: str
    depth: int
    width: int
    heads: int
    ffn: int  # Qwen2-VL: must be width * mlp_ratio
    out: int
    act: str
    window: int = 112
    fullatt: tuple[int, ...] = ()
    attn: str = "eager"

    def vision_config(self) -> VisionConfig:
        return VisionConfig(
            variant=self.variant,
            depth=self.depth,
            hidden_size=self.width,
            num_heads=self.heads,
            intermediate_size=self.ffn,
            out_hidden_size=self.out,
            hidden_act=self.act,
            window_size=self.window,
            fullatt_block_indexes=self.fullatt,
        )


CASES = {
    "2vl-d1-w32-h2": Case("qwen2_vl", 1, 32, 2, 128, 40, "quick_gelu"),
    "2vl-d2-w48-h3-gelu": Case("qwen2_vl", 2, 48, 3, 96, 24, "gelu", attn="sdpa"),
    "2vl-d4-w64-h4": Case("qwen2_vl", 4, 64, 4, 256, 48, "quick_gelu"),
    "25vl-d2-w32-win56-full[]": Case("qwen2_5_vl", 2, 32, 2, 48, 40, "silu", window=56),
    "25vl-d1-w48-win84-full[0]": Case("qwen2_5_vl", 1, 48, 2, 80, 32, "silu", window=84, fullatt=(0,)),
    "25vl-d4-w64-h4-win56-full[1,3]": Case("qwen2_5_vl", 4, 64, 4, 96, 40, "silu", window=56, fullatt=(1, 3)),
    "25vl-d3-w32-h4-win112-full[0]": Case(
        "qwen2_5_vl", 3, 32, 4, 56, 24, "gelu_pytorch_tanh", fullatt=(0,), attn="sdpa"
    ),
}

# Grids (t, h, w) in patches; windows of 56/84 px (2/3 merged tokens) do not divide most of them.
GRIDS = {
    "one": [[1, 6, 10]],
    "one-video": [[2, 14, 8]],
    "two": [[1, 14, 8], [1, 6, 10]],
    "three-mixed": [[1, 6, 10], [2, 4, 6], [1, 10, 14]],
}


def randomize(module: torch.nn.Module, seed: int) -> None:
    """O(1) activations everywhere: norms and biases random too, linears scaled by fan-in."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)


def build_hf(case: Case, random_weights: bool = True, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if case.variant == "qwen2_vl":
        vision = dict(
            depth=case.depth,
            embed_dim=case.width,
            num_heads=case.heads,
            mlp_ratio=case.ffn // case.width,
            hidden_size=case.out,
            hidden_act=case.act,
        )
        config = Qwen2VLConfig(text_config=TINY_TEXT, vision_config=vision, attn_implementation=case.attn)
        model = Qwen2VLForConditionalGeneration(config)
    else:
        vision = dict(
            depth=case.depth,
            hidden_size=case.width,
            num_heads=case.heads,
            intermediate_size=case.ffn,
            out_hidden_size=case.out,
            hidden_act=case.act,
            window_size=case.window,
            fullatt_block_indexes=list(case.fullatt),
        )
        config = Qwen2_5_VLConfig(text_config=TINY_TEXT, vision_config=vision, attn_implementation=case.attn)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.eval()
    if random_weights:
        randomize(model.model.visual, seed)
    return model


@cache
def tiny_pair(case_name: str) -> tuple[torch.nn.Module, VisionTransformer]:
    case = CASES[case_name]
    hf = build_hf(case)
    ours = VisionTransformer(case.vision_config())
    ours.load_weights(hf.state_dict())
    return hf, ours


def random_patches(grid: list[list[int]], seed: int = 1) -> torch.Tensor:
    rows = sum(t * h * w for t, h, w in grid)
    return torch.randn(rows, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed))


def hf_encode(hf: torch.nn.Module, pixels: torch.Tensor, grid: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return hf.model.visual(pixels, grid_thw=torch.tensor(grid)).pooler_output


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference, relative to the reference's largest magnitude when that exceeds 1."""
    return (ours.float() - ref.float()).abs().max().item() / max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("grid_name", GRIDS)
@pytest.mark.parametrize("case_name", CASES)
def test_matches_transformers(case_name: str, grid_name: str) -> None:
    hf, ours = tiny_pair(case_name)
    grid = GRIDS[grid_name]
    pixels = random_patches(grid)
    ref = hf_encode(hf, pixels, grid)
    out = ours(pixels, torch.tensor(grid))
    assert out.shape == ref.shape == (pixels.shape[0] // 4, CASES[case_name].out)
    assert out.dtype == torch.float32
    assert relative_error(out, ref) <= 1e-4


@pytest.mark.parametrize("case_name", ["2vl-d4-w64-h4", "25vl-d4-w64-h4-win56-full[1,3]"])
def test_images_do_not_attend_to_each_other(case_name: str) -> None:
    _, ours = tiny_pair(case_name)
    grid = [[1, 6, 10], [2, 14, 8], [1, 4, 4]]
    sizes = [t * h * w for t, h, w in grid]
    first, second = sizes[0], sizes[0] + sizes[1]
    pixels = random_patches(grid)
    changed = pixels.clone()
    changed[first:second] = random_patches([grid[1]], seed=7)

    out, out_changed = ours(pixels, grid), ours(changed, grid)
    merged = [n // 4 for n in sizes]
    ends = [merged[0], merged[0] + merged[1]]
    torch.testing.assert_close(out_changed[: ends[0]], out[: ends[0]], rtol=0, atol=1e-6)
    torch.testing.assert_close(out_changed[ends[1] :], out[ends[1] :], rtol=0, atol=1e-6)
    assert (out_changed[ends[0] : ends[1]] - out[ends[0] : ends[1]]).abs().max() > 1e-2

    # Alone or packed with others, an image encodes the same.
    alone = ours(pixels[:first], [grid[0]])
    torch.testing.assert_close(out[: ends[0]], alone, rtol=0, atol=1e-5)


def test_video_frames_attend_separately_like_transformers() -> None:
    """A t=2 grid is two frames: identical frames give identical halves (in both implementations)."""
    hf, ours = tiny_pair("25vl-d2-w32-win56-full[]")
    frame = random_patches([[1, 6, 10]])
    pixels = torch.cat([frame, frame])
    out = ours(pixels, [[2, 6, 10]])
    torch.testing.assert_close(out[:15], out[15:], rtol=0, atol=1e-6)
    assert relative_error(out, hf_encode(hf, pixels, [[2, 6, 10]])) <= 1e-4


@pytest.mark.parametrize("case_name", ["2vl-d1-w32-h2", "25vl-d2-w32-win56-full[]"])
def test_norm_eps_is_the_configs(case_name: str) -> None:
    """An mmproj may state another norm epsilon: the encoder uses it (transformers' with its norms'
    eps set to the same value is the reference)."""
    case = CASES[case_name]
    hf = build_hf(case, seed=3)
    eps = 0.5  # large enough to change the output clearly
    for module in hf.model.visual.modules():
        for attribute in ("eps", "variance_epsilon"):
            if hasattr(module, attribute):
                setattr(module, attribute, eps)
    ours = VisionTransformer(replace(case.vision_config(), norm_eps=eps))
    ours.load_weights(hf.state_dict())
    grid = GRIDS["one"]
    pixels = random_patches(grid)
    assert relative_error(ours(pixels, grid), hf_encode(hf, pixels, grid)) <= 1e-4
    default = VisionTransformer(case.vision_config())
    default.load_weights(hf.state_dict())
    assert relative_error(default(pixels, grid), hf_encode(hf, pixels, grid)) > 1e-2


def test_bfloat16_close_to_float32_reference() -> None:
    case = CASES["25vl-d4-w64-h4-win56-full[1,3]"]
    hf, _ = tiny_pair("25vl-d4-w64-h4-win56-full[1,3]")
    ours = VisionTransformer(case.vision_config(), dtype=torch.bfloat16)
    ours.load_weights(hf.state_dict())
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    grid = GRIDS["three-mixed"]
    pixels = random_patches(grid)
    out = ours(pixels, grid)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, hf_encode(hf, pixels, grid)) <= 5e-2


@pytest.mark.parametrize("case_name", ["2vl-d4-w64-h4", "25vl-d4-w64-h4-win56-full[1,3]"])
def test_bfloat16_close_to_our_float32(case_name: str) -> None:
    """The bf16 path (fused oneDNN linears, bf16 rotary and activations) against our own fp32 path."""
    hf, ours32 = tiny_pair(case_name)
    ours16 = VisionTransformer(CASES[case_name].vision_config(), dtype=torch.bfloat16)
    ours16.load_weights(hf.state_dict())
    grid = GRIDS["three-mixed"]
    pixels = random_patches(grid)
    out16, out32 = ours16(pixels, grid).float(), ours32(pixels, grid)
    assert F.cosine_similarity(out16.flatten(), out32.flatten(), dim=0) >= 0.999
    assert F.cosine_similarity(out16, out32, dim=1).min() >= 0.99  # every merged token, not just on average


def test_linear_fused_forms_match_plain_linear() -> None:
    generator = torch.Generator().manual_seed(3)
    layer = Linear(48, 40)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 48, generator=generator) / 7)
        layer.bias.copy_(torch.randn(40, generator=generator))
    x, residual = torch.randn(9, 48, generator=generator), torch.randn(9, 40, generator=generator)
    plain = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer.forward_plus(x, residual), plain + residual, rtol=0, atol=0)
    torch.testing.assert_close(layer.forward_silu(x), F.silu(plain), rtol=0, atol=0)

    layer16 = layer.to(torch.bfloat16)
    x16, residual16 = x.bfloat16(), residual.bfloat16()
    exact = F.linear(x16.float(), layer16.weight.float(), layer16.bias.float())
    for got, want in [
        (layer16(x16), exact),
        (layer16.forward_silu(x16), F.silu(exact)),
        (layer16.forward_plus(x16, residual16), exact + residual16.float()),
    ]:
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("grid", [[[1, 10, 14]], [[2, 14, 10], [1, 4, 6]], [[1, 16, 16]]])
def test_window_layout_is_a_partition_into_windows(grid: list[list[int]]) -> None:
    """Each attention segment is exactly one window of one frame; equal windows share one run."""
    side = 2  # merged tokens (window 56 px)
    order, lengths = window_layout(grid, merge=2, side=side)
    window_of_token = []  # (image, frame, window row, window col) of every merged token, original order
    for image, (t, h, w) in enumerate(grid):
        for frame in range(t):
            window_of_token += [(image, frame, r // side, c // side) for r in range(h // 2) for c in range(w // 2)]
    assert sorted(order.tolist()) == list(range(len(window_of_token)))
    start = 0
    for length in lengths:
        windows = {window_of_token[i] for i in order[start : start + length // 4].tolist()}
        assert len(windows) == 1
        start += length // 4
    assert len(set(lengths)) <= len(SegmentPlan.from_lengths(lengths).runs) <= 4 * sum(t for t, _, _ in grid)
    assert len(lengths) == len(set(window_of_token))


def test_older_prefix_and_bare_names_load_the_same() -> None:
    case = CASES["25vl-d1-w48-win84-full[0]"]
    hf, ours = tiny_pair("25vl-d1-w48-win84-full[0]")
    state = hf.state_dict()
    old_style = {name.replace("model.visual.", "visual."): t for name, t in state.items()}
    grid = GRIDS["two"]
    pixels = random_patches(grid)
    expected = ours(pixels, grid)
    for tensors in (old_style, vision_weights(state), vision_weights(old_style)):
        other = VisionTransformer(case.vision_config())
        other.load_weights(tensors)
        torch.testing.assert_close(other(pixels, grid), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case_name", ["2vl-d2-w48-h3-gelu", "25vl-d4-w64-h4-win56-full[1,3]"])
def test_weight_names_are_transformers_names(case_name: str) -> None:
    hf, _ = tiny_pair(case_name)
    hf_names = {name.removeprefix("model.visual.") for name in hf.state_dict() if name.startswith("model.visual.")}
    names = weight_names(CASES[case_name].vision_config())
    assert len(names) == len(hf_names) and set(names) == hf_names
    assert set(vision_weights(hf.state_dict())) == hf_names


def test_missing_tensor_is_named() -> None:
    hf, _ = tiny_pair("2vl-d1-w32-h2")
    state = dict(hf.state_dict())
    del state["model.visual.blocks.0.attn.qkv.bias"]
    with pytest.raises(ModelFileError, match=r"missing vision tensor 'model\.visual\.blocks\.0\.attn\.qkv\.bias'"):
        VisionTransformer(CASES["2vl-d1-w32-h2"].vision_config()).load_weights(state)


def test_wrong_shape_is_named_with_both_shapes() -> None:
    hf, _ = tiny_pair("25vl-d2-w32-win56-full[]")
    state = {name.replace("model.visual.", "visual."): t for name, t in hf.state_dict().items()}
    state["visual.merger.mlp.2.weight"] = torch.zeros(41, 128)
    with pytest.raises(ModelFileError, match=r"'visual\.merger\.mlp\.2\.weight'.*\[40, 128\].*\[41, 128\]"):
        VisionTransformer(CASES["25vl-d2-w32-win56-full[]"].vision_config()).load_weights(state)


def test_depth_mismatch_is_an_unexpected_tensor() -> None:
    hf, _ = tiny_pair("2vl-d4-w64-h4")
    shallower = replace(CASES["2vl-d4-w64-h4"].vision_config(), depth=3)
    with pytest.raises(ModelFileError, match=r"unexpected vision tensor 'model\.visual\.blocks\.3\."):
        VisionTransformer(shallower).load_weights(hf.state_dict())


def test_variant_mismatch_is_a_missing_tensor() -> None:
    hf, _ = tiny_pair("2vl-d1-w32-h2")
    case = CASES["2vl-d1-w32-h2"]
    as_qwen25 = Case("qwen2_5_vl", 1, case.width, case.heads, case.ffn, case.out, "silu")
    with pytest.raises(ModelFileError, match="missing vision tensor 'model.visual.blocks.0.mlp.gate_proj.weight'"):
        VisionTransformer(as_qwen25.vision_config()).load_weights(hf.state_dict())


def test_same_tensor_under_both_prefixes_is_rejected() -> None:
    hf, _ = tiny_pair("2vl-d1-w32-h2")
    state = dict(hf.state_dict())
    state["visual.merger.ln_q.bias"] = state["model.visual.merger.ln_q.bias"]
    with pytest.raises(ModelFileError, match="merger.ln_q.bias"):
        vision_weights(state)


def test_grid_must_match_pixel_rows() -> None:
    _, ours = tiny_pair("2vl-d1-w32-h2")
    with pytest.raises(ValueError, match="patches"):
        ours(random_patches([[1, 6, 10]]), [[1, 6, 12]])
    with pytest.raises(ValueError, match="multiples of 2"):
        ours(random_patches([[1, 5, 12]]), [[1, 5, 12]])


# ----------------------------------------------------------------------------------------------
# Real sizes (random weights): the published vision configs, one 448×448 image (grid 1×32×32).

REAL_CASES = {
    "Qwen2-VL-2B": Case("qwen2_vl", 32, 1280, 16, 5120, 1536, "quick_gelu", attn="sdpa"),
    "Qwen2.5-VL-3B": Case(
        "qwen2_5_vl", 32, 1280, 16, 3420, 2048, "silu", window=112, fullatt=(7, 15, 23, 31), attn="sdpa"
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("model_name", REAL_CASES)
def test_real_size_matches_transformers(model_name: str) -> None:
    case = REAL_CASES[model_name]
    hf = build_hf(case, random_weights=False)  # transformers' own init
    ours = VisionTransformer(case.vision_config())
    ours.load_weights(hf.state_dict())
    grid = [[1, 32, 32]]
    pixels = random_patches(grid)

    start = time.perf_counter()
    ref = hf_encode(hf, pixels, grid)
    hf_seconds = time.perf_counter() - start
    start = time.perf_counter()
    out = ours(pixels, grid)
    our_seconds = time.perf_counter() - start

    diff, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    print(
        f"\n{model_name} 448x448 fp32: transformers {hf_seconds:.2f}s, qwenvl {our_seconds:.2f}s, "
        f"max abs diff {diff:.3g}, max |ref| {scale:.3g}, relative {diff / scale:.3g}"
    )
    assert out.shape == (256, case.out)
    assert diff <= 1e-3 * scale
