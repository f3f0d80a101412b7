"""Image-encode time of qwenvl's vision encoder next to transformers' (a script, not a test).

    python benchmarks/vision.py                                   # both models, 448x448 and 868x896
    python benchmarks/vision.py --models qwen2-vl-2b --sizes 868x896 --repeat 5
    python benchmarks/vision.py --engines qwenvl --dtype float32

Both encoders get the published vision dims (Qwen2-VL-2B-Instruct, Qwen2.5-VL-3B-Instruct) and the
same random weights (transformers' module is randomized, ours loads its state_dict); transformers
runs with attn_implementation="sdpa". One still image of H x W pixels is grid (1, H/14, W/14):
random pixel rows of that many patches. Each figure is the best of --repeat encodes after one
warm-up encode; the engines take turns, and each encode starts when the CPUs are (nearly) idle,
waiting up to --idle-wait seconds: the machine may be shared, and a busy core stalls every OpenMP
region. The last columns compare
the two outputs (cosine and max difference relative to transformers' largest value).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from kernels import wait_for_idle  # benchmarks/kernels.py: time only while the CPUs are idle
from torch import nn

from qwenvl.bench import published_vision_config, randomize_weights
from qwenvl.config import VisionConfig
from qwenvl.models.vision import VisionTransformer

MODELS = ("qwen2-vl-2b", "qwen2.5-vl-3b")
ENGINES = ("qwenvl", "transformers")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def transformers_encoder(config: VisionConfig, dtype: torch.dtype) -> nn.Module:
    """transformers' encoder of the same dims, sdpa attention, its own random init."""
    if config.variant == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        hf_config = Qwen2VLVisionConfig(
            depth=config.depth,
            embed_dim=config.hidden_size,
            num_heads=config.num_heads,
            mlp_ratio=config.intermediate_size // config.hidden_size,
            hidden_size=config.out_hidden_size,
            hidden_act=config.hidden_act,
        )
        model_class: type = Qwen2VisionTransformerPretrainedModel
    else:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        hf_config = Qwen2_5_VLVisionConfig(
            depth=config.depth,
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            out_hidden_size=config.out_hidden_size,
            hidden_act=config.hidden_act,
            window_size=config.window_size,
            fullatt_block_indexes=list(config.fullatt_block_indexes),
            tokens_per_second=int(config.tokens_per_second),
        )
        model_class = Qwen2_5_VisionTransformerPretrainedModel
    hf_config._attn_implementation = "sdpa"
    return model_class._from_config(hf_config, dtype=dtype).eval()


@dataclass(frozen=True)
class Encoders:
    qwenvl: VisionTransformer
    transformers: nn.Module


def build(name: str, dtype: torch.dtype) -> Encoders:
    config = published_vision_config(name)
    hf = transformers_encoder(config, dtype)
    randomize_weights(hf)
    with torch.device("meta"):
        ours = VisionTransformer(config, dtype)
    ours = ours.to_empty(device="cpu")
    ours.load_weights(hf.state_dict())
    return Encoders(ours.eval(), hf)


def encode_fn(
    encoders: Encoders, engine: str, pixels: torch.Tensor, grid: list[list[int]]
) -> Callable[[], torch.Tensor]:
    grid_thw = torch.tensor(grid)
    if engine == "qwenvl":
        return lambda: encoders.qwenvl(pixels, grid_thw)
    return lambda: encoders.transformers(pixels, grid_thw=grid_thw).pooler_output


def best_seconds(
    fns: dict[str, Callable[[], torch.Tensor]], repeat: int, idle_wait: float
) -> dict[str, tuple[float, torch.Tensor]]:
    """Best-of-``repeat`` seconds and the output of each engine; the engines take turns, so that a
    burst of load from other processes hits both rather than one."""
    seconds: dict[str, list[float]] = {engine: [] for engine in fns}
    with torch.inference_mode():
        outs = {engine: fn() for engine, fn in fns.items()}  # warm-up
        for _ in range(repeat):
            for engine, fn in fns.items():
                wait_for_idle(timeout=idle_wait)
                start = time.perf_counter()
                outs[engine] = fn()
                seconds[engine].append(time.perf_counter() - start)
    return {engine: (min(seconds[engine]), outs[engine]) for engine in fns}


def compare(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    ours, ref = ours.float().flatten(), ref.float().flatten()
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=0).item()
    return cosine, ((ours - ref).abs().max() / ref.abs().max()).item()


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    size = int(height), int(width)
    if min(size) < 28 or size[0] % 28 or size[1] % 28:
        raise argparse.ArgumentTypeError(f"size {text!r}: height and width must be positive multiples of 28")
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--sizes", default="448x448,868x896", help="comma-separated HxW in pixels, multiples of 28")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="timed encodes per figure (best is shown)")
    parser.add_argument("--idle-wait", type=float, default=10.0, help="seconds to wait for idle CPUs per encode")
    args = parser.parse_args()
    models = args.models.split(",")
    engines = args.engines.split(",")
    for value, allowed in [(m, MODELS) for m in models] + [(e, ENGINES) for e in engines]:
        if value not in allowed:
            parser.error(f"unknown {value!r} (choose from {', '.join(allowed)})")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]

    print(f"{args.dtype}, {args.threads} threads, best of {args.repeat}")
    header = f"{'model':14} {'image':>8} {'patches':>7} " + " ".join(f"{e + ' s':>14}" for e in engines)
    if len(engines) == 2:
        header += f" {'ratio':>6} {'cosine':>9} {'max rel diff':>12}"
    print(header)
    for name in models:
        encoders = build(name, dtype)
        for height, width in sizes:
            grid = [[1, height // 14, width // 14]]
            pixels = torch.randn(
                height // 14 * (width // 14),
                encoders.qwenvl.config.patch_dim,
                generator=torch.Generator().manual_seed(1),
            ).to(dtype)
            fns = {e: encode_fn(encoders, e, pixels, grid) for e in engines}
            results = best_seconds(fns, args.repeat, args.idle_wait)
            line = f"{name:14} {f'{height}x{width}':>8} {pixels.shape[0]:>7} "
            line += " ".join(f"{results[e][0]:>14.2f}" for e in engines)
            if len(engines) == 2:
                cosine, diff = compare(results["qwenvl"][1], results["transformers"][1])
                line += f" {results['qwenvl'][0] / results['transformers'][0]:>6.2f} {cosine:>9.6f} {diff:>12.3g}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
