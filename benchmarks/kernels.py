"""Benchmark the QuantLinear kernels on the Qwen2.5-0.5B layer shapes (a script, not a test).

    python benchmarks/kernels.py              # per-layer table + whole-model passes (~20 min)
    python benchmarks/kernels.py --quick      # fewer formats and timing windows
    python benchmarks/kernels.py --compile    # also the torch.compile fused dequant-matmul (slow to build)
    python benchmarks/kernels.py --rows       # only the rows sweep (batched decode), 2 and 1 threads
    python benchmarks/kernels.py --kernels blocks,q8 --formats Q4_K,Q6_K   # exact vs int8 activations
    QWENVL_ISA=avx2 python benchmarks/kernels.py --quick   # any instruction-set path this CPU runs

Per-layer table: µs per call for 1 row (decode) and 512 rows (prefill) of bf16 activations, with
2 threads; each the best of several timing windows started when the CPUs were idle (on a shared
machine a busy core stalls OpenMP regions by whole scheduler ticks). Run it a few times and take
medians. "weight error": max |W used - W gguf| / max |W| (the prefill weights for the block kernels);
"output error": max |y - y_ref| / max |y_ref| against float64 x @ W_gguf.T, bf16 output rounding
included. One layer's weights fit in the CPU's cache, so its 1-row times are cache-warm; the model
passes read every layer once per token from memory, as decoding does. Weights are random blocks
(random codes, realistic scales).

Model passes (if the registry GGUF is present): all linear layers of the file — fused q/k/v and
gate/up, down, lm_head — as the engine would build them, at 1 row (one decode step; lm_head on it)
and 512 rows (one prefill; lm_head on the last row only).

Rows sweep (``--rows``; also part of the full run): the same layers, lm_head included, on M = 1, 2,
4, 8, 16 rows at once — one step of a server decoding M requests together — with 2 threads and
with 1 (a busy core stalls the 2-thread OpenMP regions, 1 thread is the steadier comparison).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

from qwenvl import ops
from qwenvl.ops.native import Q8_TYPES
from qwenvl.quant.linear import (
    BlockQuantLinear,
    DenseLinear,
    Int4Linear,
    Int8Linear,
    nibble_codes,
    quant_linear_from_ggml,
    quant_linear_from_parts,
)

SHAPES = {  # name: (out, in) of the 0.5B
    "qkv": (1152, 896),
    "o": (896, 896),
    "gate_up": (9728, 896),
    "down": (896, 4864),
    "lm_head": (151936, 896),
}
FORMATS = [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K, T.Q4_0, T.Q4_1, T.Q5_1, T.Q5_K, T.Q2_K, T.Q3_K, T.F16, T.BF16]
QUICK_FORMATS = [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K, T.Q4_0]
PREFILL_ROWS = 512


def others_busy(seconds: float = 0.1) -> float:
    """The fraction of CPU time other processes used over ``seconds`` (we sleep meanwhile)."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total, idle = read()
    time.sleep(seconds)
    total2, idle2 = read()
    return 1 - (idle2 - idle) / max(1, total2 - total)


WAITS = {"windows": 0, "busy": 0, "waited": 0.0}


def wait_for_idle(limit: float = 0.2, timeout: float = 30.0) -> None:
    """On a shared machine, OpenMP threads stall whole scheduler ticks when another process holds
    a core: time only while the CPUs are (nearly) idle, waiting up to ``timeout`` seconds."""
    start = time.perf_counter()
    try:
        while (busy := others_busy()) > limit and time.perf_counter() - start < timeout:
            time.sleep(0.3)
    except OSError:  # no /proc/stat: not Linux
        return
    WAITS["windows"] += 1
    WAITS["busy"] += busy > limit
    WAITS["waited"] += time.perf_counter() - start


def timed(fn: Callable[[], object], windows: int, seconds: float = 0.1, idle_timeout: float = 30.0) -> float:
    """µs per call: the best of ``windows`` timing windows of about ``seconds`` each, each started
    when the machine is idle (run the script a few times and take the median of those)."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    calls = max(1, int(seconds / max(once, 1e-7)))
    samples = []
    for _ in range(windows):
        wait_for_idle(timeout=idle_timeout)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return min(samples)


def random_blocks(ggml_type: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random codes with fp16 scales of a realistic size (weights of magnitude ~0.02)."""
    if ggml_type in (T.F16, T.BF16):
        values = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)
        dtype = torch.float16 if ggml_type == T.F16 else torch.bfloat16
        return values.to(dtype).view(torch.uint8).numpy()
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    scale = {T.Q8_0: 0.02 / 64, T.Q5_0: 0.02 / 8, T.Q5_1: 0.04 / 16, T.Q4_0: 0.02 / 4, T.Q4_1: 0.04 / 8}
    scale |= {T.Q4_K: 0.04 / 8 / 32, T.Q5_K: 0.04 / 16 / 32, T.Q6_K: 0.02 / 16 / 64}
    scale |= {T.Q2_K: 0.04 / 2 / 8, T.Q3_K: 0.02 / 4 / 32}
    # where d (and dmin, with its size) sit in a block
    where = {T.Q6_K: (208, None), T.Q2_K: (80, (82, 0.02 / 8)), T.Q3_K: (108, None)}
    where |= {
        T.Q4_1: (0, (2, -0.02)),
        T.Q5_1: (0, (2, -0.02)),
        T.Q4_K: (0, (2, 0.02 / 32)),
        T.Q5_K: (0, (2, 0.02 / 32)),
    }

    def halves(value: float) -> np.ndarray:
        values = rng.uniform(*sorted((0.5 * value, 1.5 * value)), raw.shape[:2]).astype(np.float16)
        return values.view(np.uint8).reshape(*raw.shape[:2], 2)

    d, minimum = where.get(ggml_type, (0, None))
    raw[..., d : d + 2] = halves(scale[ggml_type])
    if minimum is not None:
        raw[..., minimum[0] : minimum[0] + 2] = halves(minimum[1])
    return raw.reshape(rows, -1)


def variants(ggml_type: T) -> list[str]:
    """Kernels to time: the quant_linear_from_ggml kernels, plus "blocks, 1 piece" (the block
    kernels with a one-piece bf16 prefill: faster, rounds the weights to bf16)."""
    names = ["blocks", "blocks, 1 piece", "q8", "dense", "int8"]
    if ggml_type not in Q8_TYPES:
        names.remove("q8")  # the float formats stay exact
    if ggml_type in (T.Q4_0, T.Q4_1, T.Q4_K):
        names.append("int4")
    if ggml_type == T.BF16:
        names.remove("blocks, 1 piece")  # bf16 is one piece
    return names


def build(raw: np.ndarray, ggml_type: T, shape: tuple[int, int], variant: str) -> torch.nn.Module:
    if variant == "blocks, 1 piece":
        return BlockQuantLinear(torch.from_numpy(raw), ggml_type, shape, pieces=1)
    return quant_linear_from_ggml(raw, ggml_type, shape, kernel=variant)


def max_error(layer: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> float:
    ref = x.double() @ weight.double().T
    return ((layer(x).double() - ref).abs().max() / ref.abs().max()).item()


def weight_error(layer: torch.nn.Module, raw: np.ndarray, ggml_type: T, weight: torch.Tensor) -> float:
    """max |W used - W gguf| / max |W|: the re-quantization alone (bf16 output rounding aside)."""
    if isinstance(layer, BlockQuantLinear):
        pieces = ops.kernels().dequantize(layer.blocks, ggml_type, layer.in_features, layer.pieces)
        used = pieces.float().view(layer.out_features, layer.pieces, -1).sum(1)  # the prefill weights
    elif isinstance(layer, DenseLinear):
        used = layer.weight.float()
    elif isinstance(layer, Int8Linear):
        used = layer.codes.float() * layer.scales.float()[:, None]
    elif isinstance(layer, Int4Linear):
        codes, _, _ = nibble_codes(torch.from_numpy(raw), ggml_type, tuple(weight.shape))
        scale, zero = (layer.scale_zero[..., i].float().t().repeat_interleave(32, 1) for i in (0, 1))
        used = (codes.float() - 8) * scale + zero
    else:
        return float("nan")
    return ((used - weight).abs().max() / weight.abs().max()).item()


def cell(value: float, fmt: str) -> str:
    return "–" if math.isnan(value) else fmt.format(value)


def layer_table(formats: list[T], windows: int, kernels: list[str] | None = None) -> None:
    rng = np.random.default_rng(0)
    print(
        "| format | layer | kernel | exact | B/weight | µs, 1 row | GB/s | µs, 512 rows | "
        "weight error | output error, 1 row | 512 rows |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ggml_type in formats:
        block_size = GGML_QUANT_SIZES[ggml_type][0]
        for name, (rows, cols) in SHAPES.items():
            if cols % block_size:
                continue  # K-quants need rows of 256: only ffn_down (4864) in the 0.5B
            raw = random_blocks(ggml_type, rows, cols, rng)
            weight = ops.kernels().dequantize(torch.from_numpy(raw), ggml_type, cols)
            x1 = torch.randn(1, cols).bfloat16()
            xp = torch.randn(PREFILL_ROWS, cols).bfloat16()
            full = name != "lm_head"  # the engine needs the lm_head on one row only
            for variant in [v for v in variants(ggml_type) if kernels is None or v in kernels]:
                layer = build(raw, ggml_type, (rows, cols), variant)
                decode = timed(lambda: layer(x1), windows)
                prefill = timed(lambda: layer(xp), max(3, windows // 2)) if full else float("nan")
                err1 = max_error(layer, x1, weight)
                errp = max_error(layer, xp[:64], weight) if full else float("nan")
                bytes_ = layer.weight_bytes
                print(
                    f"| {ggml_type.name} | {name} {cols}→{rows} | {variant} | {'yes' if layer.exact else 'no'} | "
                    f"{bytes_ / (rows * cols):.3g} | {decode:,.0f} | {bytes_ / decode / 1e3:.1f} | "
                    f"{cell(prefill, '{:,.0f}')} | {weight_error(layer, raw, ggml_type, weight):.1e} | {err1:.1e} | "
                    f"{cell(errp, '{:.1e}')} |",
                    flush=True,
                )
                layer = None  # free it before the next one is built


def model_layers(path: str, kernel: str) -> tuple[list[torch.nn.Module], torch.nn.Module, int]:
    """(every layer's [qkv, o, gate_up, down] modules in order, lm_head, hidden size) from a GGUF file."""
    if kernel == "blocks, 1 piece":
        layers, lm_head, hidden = model_layers(path, "blocks")
        for module in [*layers, lm_head]:
            for part in module.modules():
                if isinstance(part, BlockQuantLinear):
                    part.pieces = 1
        return layers, lm_head, hidden
    from qwenvl.weights.gguf import read_gguf

    model = read_gguf(path)
    cfg = model.config.text

    def part(name: str) -> tuple[np.ndarray, T, tuple[int, int]]:
        info = model.info(name)
        return model.raw(name), info.ggml_type, info.shape

    layers: list[torch.nn.Module] = []
    for i in range(cfg.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        qkv_bias = torch.cat([model.tensor(f"{attn}{p}_proj.bias") for p in "qkv"])
        layers += [
            quant_linear_from_parts([part(f"{attn}{p}_proj.weight") for p in "qkv"], qkv_bias, kernel=kernel),
            quant_linear_from_ggml(*part(f"{attn}o_proj.weight"), kernel=kernel),
            quant_linear_from_parts([part(f"{mlp}{p}_proj.weight") for p in ("gate", "up")], kernel=kernel),
            quant_linear_from_ggml(*part(f"{mlp}down_proj.weight"), kernel=kernel),
        ]
    head = "lm_head.weight" if "lm_head.weight" in model.hf_names() else "model.embed_tokens.weight"
    return layers, quant_linear_from_ggml(*part(head), kernel=kernel), cfg.hidden_size


def model_passes(path: str, windows: int, kernel_names: list[str]) -> None:
    print(f"\nWhole-model linear layers of {path}")
    print("| kernel | weight MB | decode ms/token (1 row, + lm_head) | GB/s | prefill ms (512 rows) | tok/s |")
    print("|---|---|---|---|---|---|")
    for kernel in kernel_names:
        layers, lm_head, hidden = model_layers(path, kernel)
        mb = (sum(layer_bytes(m) for m in layers) + layer_bytes(lm_head)) / 1e6
        inputs = {m.in_features for m in layers}
        x1 = {k: torch.randn(1, k).bfloat16() for k in inputs}
        xp = {k: torch.randn(PREFILL_ROWS, k).bfloat16() for k in inputs}

        def decode() -> None:
            for m in layers:
                m(x1[m.in_features])
            lm_head(x1[hidden])

        def prefill() -> None:
            for m in layers:
                m(xp[m.in_features])
            lm_head(xp[hidden][-1:])

        d = timed(decode, windows, seconds=0.3) / 1e3
        p = timed(prefill, max(3, windows // 2), seconds=0.5) / 1e3
        rate = PREFILL_ROWS / p * 1e3
        print(f"| {kernel} | {mb:,.0f} | {d:.1f} | {mb / d:.1f} | {p:,.0f} | {rate:,.0f} |", flush=True)
        layers = lm_head = None  # free them before the next ones are built


SWEEP_ROWS = (1, 2, 4, 8, 16)


def rows_sweep(path: str, windows: int, thread_counts: tuple[int, ...] = (2, 1), kernel: str = "blocks") -> None:
    """ms per decode step of M rows through every linear layer (lm_head on all M rows)."""
    layers, lm_head, hidden = model_layers(path, kernel)
    inputs = {m.in_features for m in [*layers, lm_head]}
    print(f"\nRows sweep ({kernel}): whole-model linear layers of {path}, M rows per call (best of {windows} windows)")
    print("| threads | " + " | ".join(f"M = {m}" for m in SWEEP_ROWS) + " | M = 16 / M = 1 |")
    print("|---|" + "---|" * (len(SWEEP_ROWS) + 1))
    previous = torch.get_num_threads()
    for threads in thread_counts:
        torch.set_num_threads(threads)
        cells = []
        for rows in SWEEP_ROWS:
            x = {k: torch.randn(rows, k).bfloat16() for k in inputs}

            def step() -> None:
                for m in [*layers, lm_head]:
                    m(x[m.in_features])

            cells.append(timed(step, windows, seconds=0.3, idle_timeout=3.0) / 1e3)
        row = " | ".join(f"{ms:.1f}" for ms in cells)
        print(f"| {threads} | {row} | {cells[-1] / cells[0]:.2f} |", flush=True)
    torch.set_num_threads(previous)
    layers = lm_head = None  # free them before the next ones are built


def layer_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for name, b in module.named_buffers() if not name.endswith("bias"))


def memory_bandwidth(windows: int) -> float:
    """GB/s of reading a 1 GB tensor (torch's fp32 sum) with the current threads."""
    data = torch.ones(256 << 20, dtype=torch.float32)
    return data.numel() * 4 / timed(lambda: data.sum(), windows, seconds=0.5) / 1e3


def compiled_fused(windows: int) -> None:
    """torch.compile of a fused dequantize-and-multiply (Q8_0 codes and scales as separate tensors)."""
    rows, cols = SHAPES["gate_up"]
    codes = torch.randint(-127, 128, (rows, cols // 32, 32), dtype=torch.int8)
    scales = (torch.rand(rows, cols // 32, 1) * 0.01).half()

    def fused(x: torch.Tensor) -> torch.Tensor:
        w = (codes.float() * scales.float()).reshape(rows, cols)
        return (w * x.float()).sum(-1)[None].to(x.dtype)

    x = torch.randn(1, cols).bfloat16()
    start = time.perf_counter()
    compiled = torch.compile(fused, dynamic=False)
    compiled(x)
    build = time.perf_counter() - start
    print(f"\ntorch.compile fused Q8_0 gate_up, 1 row: {timed(lambda: compiled(x), windows):,.0f} µs "
          f"(compile {build:.0f} s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer formats and timing windows")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile fused kernel")
    parser.add_argument("--gguf", help="GGUF for the model passes (default: the registry model, if present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", help="comma-separated GGML types for the layer table (default: all)")
    parser.add_argument("--skip-model", action="store_true", help="leave out the whole-model passes")
    parser.add_argument("--rows", action="store_true", help="only the rows sweep (decode of 1-16 rows at once)")
    parser.add_argument("--kernels", help="comma-separated kernels to time (default: all; the rows sweep: blocks)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    windows = 3 if args.quick else 7
    chosen = ops.describe()
    path = " + ".join([chosen["isa"], *chosen["extensions"]])
    print(f"threads {torch.get_num_threads()}, kernels: {path}, load average {os.getloadavg()[0]:.1f}")
    if not args.rows:
        print(f"memory read bandwidth: {memory_bandwidth(windows):.1f} GB/s\n")
    formats = [T[name] for name in args.formats.split(",")] if args.formats else None
    kernels = args.kernels.split(",") if args.kernels else None
    if not args.rows:
        layer_table(formats or (QUICK_FORMATS if args.quick else FORMATS), windows, kernels)
    path = args.gguf
    if args.skip_model:
        path = ""
    elif path is None:
        from qwenvl import defaults

        try:
            path = str(defaults.default_gguf_path())
        except Exception as error:  # the demo packages are optional
            print(f"\n(no registry GGUF: {error})")
    if path and not args.rows:
        passes = ["blocks", "blocks, 1 piece", "q8", "dense", "int8"]
        model_passes(path, windows, [k for k in passes if kernels is None or k in kernels])
    if path:
        for kernel in [k for k in ("blocks", "q8") if k in (kernels or ["blocks"])]:
            rows_sweep(path, windows, kernel=kernel)
    if args.compile:
        compiled_fused(windows)
    print(
        f"\n(timing windows: {WAITS['windows']}, {WAITS['busy']} of them started while other processes "
        f"still used the CPUs; {WAITS['waited']:.0f} s spent waiting for idle CPUs)"
    )


if __name__ == "__main__":
    main()
