"""``qwenvl bench``: qwenvl and its installed peers (transformers, llama.cpp) on the same model, side by side.

Every engine runs in a child process of its own (``python -m qwenvl.bench --worker SPEC RESULT``), so
its load time and peak RSS (``ru_maxrss``) are its alone; the parent prepares each peer's copy of the
model, runs the engines one after the other and prints a table (or ``--json``: one object per engine).

What each engine measures, after one warm-up generation (an 8-token prompt, 2 tokens):

- ``prefill_tok_s``: --prompt-tokens token ids (an ordinary English paragraph repeated, tokenized and
  cut, the same ids for every engine) over the time of their forward pass, KV cache filled, first
  token picked;
- ``decode_tok_s``: the greedy tokens after the first one (which comes out of the prefill) over the
  time of their one-token steps; every engine decodes exactly --gen-tokens, end-of-sequence ignored
  (``decoded_tokens`` says how many were timed);
- ``image_encode_s`` (VL models, or ``--vision-config``): the vision encoder's forward pass on one
  preprocessed WxH image, after a 56x56 warm-up;
- ``ttft_s`` (VL models): an image prompt, load excluded: image preprocessing + encode + prefill +
  first token;
- ``load_s``: from nothing to a model ready to run (qwenvl.load / from_pretrained / Llama(...));
- ``peak_rss_mb``: the worker's ``ru_maxrss`` at the end (MiB; it includes the Python runtime and,
  for qwenvl and transformers, torch: ``import_rss_mb`` is the RSS before the model was loaded).

The peers run the same model: transformers loads an HF checkpoint (a GGUF is exported once with
``export_hf`` into the cache directory, float32, and loaded in --peer-dtype, bfloat16 by default);
llama.cpp (llama-cpp-python, not a qwenvl dependency: skipped when absent) loads a GGUF (an HF
checkpoint is converted once with ``qwenvl convert``'s ``convert_hf``, f16). llama.cpp's CPU "extra
buffer types" (weight repacking: its AMX path crashes on this machine) are turned off.

This module imports only the standard library and qwenvl.errors at top level: the llama.cpp worker
does not import torch, so its RSS is llama.cpp's.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from .errors import QwenVLError

ENGINES = ("qwenvl", "transformers", "llama.cpp")
PEERS = ENGINES[1:]
PEER_MODULES = {"transformers": "transformers", "llama.cpp": "llama_cpp"}
PEER_PACKAGES = {"transformers": "transformers", "llama.cpp": "llama-cpp-python"}
FIGURES = ("prefill_tok_s", "decode_tok_s", "image_encode_s", "ttft_s", "load_s", "peak_rss_mb")
VISION_CONFIG_NAMES = ("qwen2-vl-2b", "qwen2.5-vl-3b")
DTYPE_CHOICES = ("auto", "bfloat16", "float32")
PEER_DTYPE_CHOICES = ("bfloat16", "float32")
KERNEL_CHOICES = ("auto", "blocks", "q8", "dense", "int8", "int4")  # qwenvl.quant.linear.KERNELS
DEFAULT_IMAGE = (448, 448)
WARMUP_PROMPT_TOKENS = 8
WARMUP_IMAGE = (56, 56)
TTFT_TEXT = "Describe this image."
PROMPT_TEXT = (
    "The history of the old harbour town begins with a small settlement on the river, where traders "
    "from the northern forests and the southern plains met every autumn to exchange grain, wool, salt "
    "and iron tools. Over the centuries the market grew into a walled town with a stone bridge, a "
    "cathedral and a guild hall, and its merchants sent ships along the coast to distant ports. "
)
USER_ERROR = 2


# ----------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class BenchOptions:
    model: str | None = None  # HF dir, hub id or .gguf; None: the default GGUF (or --vision-config)
    mmproj: str | None = None
    prompt_tokens: int = 512
    gen_tokens: int = 128
    image: tuple[int, int] | None = None  # (width, height); None: 448x448 for VL models
    threads: int | None = None  # None: physical cores
    compare: tuple[str, ...] = ()
    dtype: str = "auto"  # qwenvl's compute dtype
    kernel: str = "auto"  # qwenvl's --kernel (GGUF weights)
    peer_dtype: str = "bfloat16"  # transformers' dtype
    vision_config: str | None = None  # benchmark a random-weight vision encoder of published dims
    repeat: int = 1
    speculative: str | None = None  # "ngram": qwenvl also decodes with prompt-lookup speculation, alternating
    spec_tokens: int | None = None

    def validate(self) -> BenchOptions:
        checks = [
            (self.prompt_tokens >= 1, f"--prompt-tokens must be at least 1, got {self.prompt_tokens}"),
            (
                self.gen_tokens >= 2,
                f"--gen-tokens must be at least 2 (the first token comes from the prefill), got {self.gen_tokens}",
            ),
            (self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}"),
            (self.repeat >= 1, f"--repeat must be at least 1, got {self.repeat}"),
            (self.dtype in DTYPE_CHOICES, f"--dtype {self.dtype!r}: choose from {', '.join(DTYPE_CHOICES)}"),
            (self.kernel in KERNEL_CHOICES, f"--kernel {self.kernel!r}: choose from {', '.join(KERNEL_CHOICES)}"),
            (
                self.peer_dtype in PEER_DTYPE_CHOICES,
                f"--peer-dtype {self.peer_dtype!r}: choose from {', '.join(PEER_DTYPE_CHOICES)}",
            ),
            (
                self.vision_config is None or self.vision_config in VISION_CONFIG_NAMES,
                f"--vision-config {self.vision_config!r}: choose from {', '.join(VISION_CONFIG_NAMES)}",
            ),
            (
                not (self.vision_config and (self.model or self.mmproj)),
                "--vision-config benchmarks a random-weight vision encoder: it takes no MODEL or --mmproj",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise QwenVLError(message)
        if self.speculative is not None or self.spec_tokens is not None:
            self._check_speculation()
        return self

    def _check_speculation(self) -> None:
        from .engine.speculative import MAX_TOKENS

        if self.speculative is None:
            raise QwenVLError("--spec-tokens goes with --speculative")
        if self.speculative != "ngram":
            raise QwenVLError(f"--speculative {self.speculative!r}: the method is ngram")
        if self.spec_tokens is not None and not 1 <= self.spec_tokens <= MAX_TOKENS:
            raise QwenVLError(f"--spec-tokens must be in 1 … {MAX_TOKENS}, got {self.spec_tokens}")
        if self.vision_config:
            raise QwenVLError("--speculative measures text decoding: it takes no --vision-config")


def parse_image_size(text: str) -> tuple[int, int]:
    """'448x448' → (448, 448): width x height in pixels."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise QwenVLError(f"--image {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 448x448")
    return int(width), int(height)


def parse_compare(text: str | None) -> tuple[str, ...]:
    """'transformers,llama.cpp' → ('transformers', 'llama.cpp'), in the order given, without repeats."""
    if not text:
        return ()
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise QwenVLError(f"--compare {unknown[0]!r}: choose from {', '.join(PEERS)}")
    return tuple(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------
# The parent: prepare, run one worker per engine, collect


@dataclass
class EngineRun:
    """What a worker is asked to do (written to a JSON file it reads)."""

    engine: str
    model: str | None  # the file or directory this engine loads
    mmproj: str | None
    arch: str | None
    prompt_ids: list[int]
    gen_tokens: int
    image: tuple[int, int] | None
    threads: int
    dtype: str
    vision_config: str | None
    repeat: int
    kernel: str = "auto"
    speculative: str | None = None  # qwenvl only: also decode with speculation (alternating with plain)
    spec_tokens: int | None = None


def run_bench(options: BenchOptions, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One record per engine (qwenvl first, then the peers in --compare order), ratios added to the peers."""
    from .runtime import physical_cores

    options = options.validate()
    threads = options.threads or physical_cores()
    say = progress or (lambda message: None)
    target = _bench_target(options)
    records = []
    for engine in ("qwenvl", *options.compare):
        base = _record_base(engine, options, target, threads)
        try:
            model, mmproj, note = _engine_model(engine, options, target, say)
        except _Skip as skip:
            records.append({**base, "status": "skipped", "note": str(skip)})
            continue
        run = EngineRun(
            engine=engine,
            model=model,
            mmproj=mmproj,
            arch=target.arch,
            prompt_ids=target.prompt_ids,
            gen_tokens=options.gen_tokens,
            image=target.image,
            threads=threads,
            dtype=options.dtype if engine == "qwenvl" else options.peer_dtype,
            vision_config=options.vision_config,
            repeat=options.repeat,
            kernel=options.kernel,
            speculative=options.speculative if engine == "qwenvl" else None,
            spec_tokens=options.spec_tokens if engine == "qwenvl" else None,
        )
        say(f"running {engine} ...")
        result = run_worker(run)
        notes = [n for n in (note, result.pop("note", None)) if n]
        record = {**base, **result, "model": model or base["model"], "model_file_mb": _files_mb(model, mmproj)}
        records.append({**record, "note": "; ".join(notes) or None})
    return add_ratios(records)


@dataclass(frozen=True)
class _Target:
    model: str | None  # what qwenvl loads (resolved), None in --vision-config mode
    mmproj: str | None
    arch: str | None
    is_gguf: bool
    prompt_ids: list[int]
    image: tuple[int, int] | None


class _Skip(Exception):
    """An engine that cannot run this benchmark (not installed, no usable model file)."""


def _bench_target(options: BenchOptions) -> _Target:
    """Resolve MODEL, check it opens, make the prompt ids; or the --vision-config mode."""
    if options.vision_config:
        return _Target(None, None, None, False, [], options.image or DEFAULT_IMAGE)
    from .weights.checkpoint import open_checkpoint

    if options.model is None:
        from .defaults import default_gguf_path

        model = str(default_gguf_path())
    else:
        model = options.model
    checkpoint = open_checkpoint(model, mmproj=options.mmproj)
    is_vl = checkpoint.config.vision is not None
    if options.image and not is_vl:
        if checkpoint.config.arch == "qwen2_vl":  # a Qwen2-VL GGUF without its mmproj beside it
            raise QwenVLError(
                f"{checkpoint.source} is a Qwen2-VL model whose vision half is in another file: give its "
                "mmproj GGUF with --mmproj FILE"
            )
        raise QwenVLError(
            f"{checkpoint.source} is a text-only model: --image needs a Qwen2-VL / Qwen2.5-VL model "
            "(or --vision-config)"
        )
    image = (options.image or DEFAULT_IMAGE) if is_vl else None
    is_gguf = Path(model).suffix.lower() == ".gguf"
    mmproj = str(Path(options.mmproj).resolve()) if options.mmproj else None
    source = str(Path(checkpoint.source).resolve())
    ids = prompt_token_ids(checkpoint.tokenizer.encode, options.prompt_tokens)
    return _Target(source, mmproj, checkpoint.config.arch, is_gguf, ids, image)


def prompt_token_ids(encode: Callable[[str], list[int]], count: int) -> list[int]:
    """Exactly ``count`` ids of PROMPT_TEXT repeated (ordinary text: a model keeps continuing it)."""
    piece = encode(PROMPT_TEXT)
    repeats = -(-count // len(piece))
    return (piece * repeats)[:count]


def _record_base(engine: str, options: BenchOptions, target: _Target, threads: int) -> dict[str, Any]:
    image = target.image
    return {
        "engine": engine,
        **{figure: None for figure in FIGURES},
        "model": target.model or f"{options.vision_config} vision encoder (random weights)",
        "vision_config": options.vision_config,
        "threads": threads,
        "prompt_tokens": len(target.prompt_ids) or None,
        "gen_tokens": options.gen_tokens if target.prompt_ids else None,
        "decoded_tokens": None,
        "image": f"{image[0]}x{image[1]}" if image else None,
        "dtype": None,
        "kernel_isa": None,
        "kernel": options.kernel if engine == "qwenvl" else None,
        "repeat": options.repeat,
        "model_file_mb": None,
        "import_rss_mb": None,
        "other_cpu_cores": None,
        "status": None,
        "note": None,
    }


def peer_installed(engine: str) -> bool:
    return importlib.util.find_spec(PEER_MODULES[engine]) is not None


def _engine_model(
    engine: str, options: BenchOptions, target: _Target, say: Callable[[str], None]
) -> tuple[str | None, str | None, str | None]:
    """(model path, mmproj path, note) of this engine's copy of the model; _Skip when it cannot run."""
    if engine == "qwenvl":
        return target.model, target.mmproj, None
    if not peer_installed(engine):
        raise _Skip(f"{PEER_PACKAGES[engine]} is not installed")
    if engine == "transformers":
        return _transformers_model(options, target, say)
    return _llama_cpp_model(target, say)


def _transformers_model(
    options: BenchOptions, target: _Target, say: Callable[[str], None]
) -> tuple[str | None, str | None, str | None]:
    if target.model is None:
        return None, None, "sdpa attention, random weights"
    if not target.is_gguf:
        return target.model, None, "sdpa attention"
    from .defaults import default_gguf_path, default_hf_export_path

    if target.mmproj is None and Path(target.model) == default_gguf_path().resolve():
        directory = default_hf_export_path()  # the parity tests' export, made once
    else:
        directory = export_for_transformers(target.model, target.mmproj, say)
    return str(directory), None, f"sdpa attention, on qwenvl's float32 export {directory}"


def export_for_transformers(gguf_path: str, mmproj: str | None, say: Callable[[str], None]) -> Path:
    """The GGUF (+ mmproj) as an HF checkpoint in the cache directory, exported once."""
    from .defaults import cache_dir
    from .errors import ModelFileError
    from .weights.export import export_hf

    directory = cache_dir() / "bench" / f"{Path(gguf_path).stem}-hf-{_files_digest(gguf_path, mmproj)}"
    if (directory / "config.json").is_file():
        return directory
    say(f"exporting {Path(gguf_path).name} as an HF checkpoint into {directory} (once) ...")
    try:
        return export_hf(gguf_path, directory, mmproj=mmproj, overwrite=directory.exists())
    except ModelFileError as error:
        raise _Skip(f"needs an HF checkpoint and the export failed: {error}") from None


def _llama_cpp_model(target: _Target, say: Callable[[str], None]) -> tuple[str | None, str | None, str | None]:
    if target.model is None:
        raise _Skip("llama.cpp's vision encoder (clip) is not benchmarked")
    note = "use_extra_bufts off (no weight repacking)"
    if target.is_gguf:
        return target.model, None, note
    gguf_path = convert_for_llama_cpp(target.model, say)
    return str(gguf_path), None, f"{note}, on qwenvl's f16 conversion {gguf_path}"


def convert_for_llama_cpp(hf_dir: str, say: Callable[[str], None]) -> Path:
    """The HF checkpoint's text model as an f16 GGUF in the cache directory, converted once."""
    from .convert import convert_hf
    from .defaults import cache_dir

    directory = cache_dir() / "bench" / f"{Path(hf_dir).name}-gguf-{_files_digest(hf_dir)}"
    existing = sorted(p for p in directory.glob("*.gguf") if not p.name.startswith("mmproj-"))
    if existing:
        return existing[0]
    say(f"converting {hf_dir} to an f16 GGUF into {directory} (once) ...")
    try:
        written = convert_hf(hf_dir, directory, out_type="f16", progress=False)
    except QwenVLError as error:
        raise _Skip(f"needs a GGUF and the conversion failed: {error}") from None
    return written[0].path


def _files_digest(*paths: str | None) -> str:
    """A short key of the inputs' paths, sizes and modification times (a changed input is re-done)."""
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            continue
        for file in sorted(_model_files(Path(path))):
            stat = file.stat()
            digest.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:10]


def _model_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".gguf")]


def _files_mb(*paths: str | None) -> float | None:
    files = [f for p in paths if p for f in _model_files(Path(p)) if f.suffix in (".gguf", ".safetensors", ".bin")]
    return round(sum(f.stat().st_size for f in files) / 2**20, 1) if files else None


def run_worker(run: EngineRun) -> dict[str, Any]:
    """Run one engine in a fresh Python process; its figures, or status "failed" with the reason."""
    with tempfile.TemporaryDirectory(prefix="qwenvl-bench-") as folder:
        spec, result = Path(folder) / "spec.json", Path(folder) / "result.json"
        spec.write_text(json.dumps(asdict(run)), encoding="utf-8")
        env = {
            **os.environ,
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        command = [sys.executable, "-m", "qwenvl.bench", "--worker", str(spec), str(result)]
        with OtherCpuUse() as others:
            done = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.is_file():
            return {**json.loads(result.read_text(encoding="utf-8")), "other_cpu_cores": others.cores}
    lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
    reason = lines[-1].strip() if lines else f"exit status {done.returncode}"
    return {"status": "failed", "note": f"the worker died: {reason} (exit status {done.returncode})"}


class OtherCpuUse:
    """Cores that other processes kept busy, on average, while the block ran (None off Linux).

    The machine's busy time (/proc/stat) minus the CPU time of this process's children: on a shared
    machine this says how much the figures of that run were disturbed (0 = a quiet machine).
    """

    def __enter__(self) -> OtherCpuUse:
        self.cores: float | None = None
        self._start = (time.perf_counter(), _busy_cpu_seconds(), _children_cpu_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, children = self._start
        busy_now = _busy_cpu_seconds()
        if busy is None or busy_now is None:
            return
        elapsed = time.perf_counter() - wall
        others = (busy_now - busy) - (_children_cpu_seconds() - children)
        self.cores = round(max(0.0, others) / elapsed, 2) if elapsed > 0 else None


def _busy_cpu_seconds() -> float | None:
    """Seconds all CPUs have spent not idle since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in handle.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def add_ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each peer gets ``ratio``: qwenvl's figure divided by the peer's (for tok/s higher is better for
    qwenvl, for seconds and MB lower is)."""
    ours = next((r for r in records if r["engine"] == "qwenvl" and r["status"] == "ok"), None)
    for record in records:
        if record["engine"] == "qwenvl":
            continue
        ratio = {}
        if ours is not None and record["status"] == "ok":
            for figure in FIGURES:
                mine, theirs = ours.get(figure), record.get(figure)
                if mine is not None and theirs:
                    ratio[figure] = round(mine / theirs, 3)
        record["ratio"] = ratio or None
    return records


# ----------------------------------------------------------------------------------------------
# Output


COLUMNS = [  # (figure, header, format)
    ("prefill_tok_s", "prefill tok/s", "{:.1f}"),
    ("decode_tok_s", "decode tok/s", "{:.2f}"),
    ("image_encode_s", "image encode s", "{:.2f}"),
    ("ttft_s", "TTFT s", "{:.2f}"),
    ("load_s", "load s", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
]


def format_table(records: list[dict[str, Any]]) -> str:
    """The figures of every engine, then one ratio row per peer (qwenvl ÷ peer), then notes."""
    first = records[0]
    head = [f"model: {first['model']}", f"threads: {first['threads']}"]
    if first["prompt_tokens"]:
        head.append(f"prompt: {first['prompt_tokens']} tokens, {first['gen_tokens']} generated")
    if first["image"]:
        head.append(f"image: {first['image']}")
    if first["repeat"] > 1:
        head.append(f"median of {first['repeat']} runs")
    rows = [["engine"] + [header for _, header, _ in COLUMNS]]
    for record in records:
        if record["status"] != "ok":
            rows.append([record["engine"], record["status"]] + [""] * (len(COLUMNS) - 1))
            continue
        rows.append([record["engine"]] + [_cell(record.get(f), fmt) for f, _, fmt in COLUMNS])
    for record in records:
        if record.get("ratio"):
            ratio = record["ratio"]
            rows.append([f"qwenvl ÷ {record['engine']}"] + [_ratio_cell(ratio.get(f)) for f, _, _ in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" · ".join(head)]
    lines += [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines += [_speculative_line(r) for r in records if r.get("spec_decode_tok_s") is not None]
    notes = [f"  {r['engine']}: {_record_note(r)}" for r in records if _record_note(r)]
    if notes:
        lines += ["notes:"] + notes
    if any(r.get("ratio") for r in records):
        lines.append("ratios: qwenvl ÷ peer (tok/s: above 1 is qwenvl faster; s and MB: below 1 is qwenvl better)")
    return "\n".join(lines)


def _speculative_line(record: dict[str, Any]) -> str:
    """The qwenvl record's speculative figures (bench --speculative), one line."""
    rate = record["spec_acceptance_rate"]
    return (
        f"{record['engine']} --speculative ngram --spec-tokens {record['spec_tokens']}: decode "
        f"{record['spec_decode_tok_s']:.2f} tok/s ({record['spec_speedup']:.2f}× plain), acceptance "
        f"{'—' if rate is None else f'{rate:.0%}'}, same tokens as plain: {'yes' if record['spec_identical'] else 'NO'}"
    )


def _cell(value: Any, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _ratio_cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _record_note(record: dict[str, Any]) -> str:
    parts = []
    if record.get("dtype"):
        parts.append(record["dtype"])
    if record.get("kernel_isa"):
        parts.append(f"{record['kernel_isa']} kernels")
    if record.get("kernel") not in (None, "auto"):
        parts.append(f"--kernel {record['kernel']}")
    decoded, wanted = record.get("decoded_tokens"), record.get("gen_tokens")
    if decoded is not None and wanted is not None and decoded != wanted:
        parts.append(f"decoded {decoded} of {wanted} tokens (stopped early)")
    if record.get("note"):
        parts.append(record["note"])
    if record.get("other_cpu_cores"):
        parts.append(f"other processes used {record['other_cpu_cores']:.2f} cores meanwhile")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# CLI


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="HF checkpoint dir, hub id or .gguf (default: the embedded Qwen2.5-Coder-0.5B GGUF)",
    )
    parser.add_argument("--mmproj", metavar="FILE", help="the vision GGUF of a Qwen2-VL / Qwen2.5-VL text GGUF")
    parser.add_argument("--prompt-tokens", default="512", metavar="N", help="prompt length for prefill (default 512)")
    parser.add_argument("--gen-tokens", default="128", metavar="N", help="greedy tokens to generate (default 128)")
    parser.add_argument(
        "--image", metavar="WxH", help="image size for image encode and TTFT (VL models; default 448x448)"
    )
    parser.add_argument("--threads", metavar="N", help="threads for every engine (default: physical cores)")
    parser.add_argument("--compare", metavar="PEERS", help="also run these engines: transformers,llama.cpp")
    parser.add_argument(
        "--dtype", default="auto", metavar="DTYPE", help="qwenvl compute dtype: auto, bfloat16, float32 (default auto)"
    )
    parser.add_argument(
        "--kernel",
        default="auto",
        metavar="KERNEL",
        help="qwenvl's kernel for GGUF weights: "
        + ", ".join(KERNEL_CHOICES)
        + " (default auto; see qwenvl run --help)",
    )
    parser.add_argument(
        "--peer-dtype",
        default="bfloat16",
        metavar="DTYPE",
        help="transformers dtype: bfloat16 or float32 (default bfloat16)",
    )
    parser.add_argument(
        "--vision-config",
        metavar="NAME",
        help="benchmark a random-weight vision encoder of published dims instead of MODEL: "
        + ", ".join(VISION_CONFIG_NAMES),
    )
    parser.add_argument("--repeat", default="1", metavar="N", help="timed runs per engine; the median is shown")
    parser.add_argument(
        "--speculative",
        nargs="?",
        const="ngram",
        metavar="ngram",
        help="qwenvl also decodes with prompt-lookup speculation (alternating with plain runs): its decode tok/s, "
        "speedup, acceptance rate and whether the tokens are the same",
    )
    parser.add_argument("--spec-tokens", metavar="K", help="with --speculative: tokens drafted per step (default 5)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per engine")
    _one_line_errors(parser)


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse prints the usage before its error (and leaves unknown options to the top parser, which does
    the same); the bench prints its error alone, on one line."""

    def error(message: str) -> NoReturn:
        parser.exit(USER_ERROR, f"qwenvl: error: bench: {message}\n")

    parse_known = parser.parse_known_args

    def parse_known_args(args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = parse_known(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    parser.error = error  # type: ignore[method-assign]
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        model=args.model,
        mmproj=args.mmproj,
        prompt_tokens=_int_option("--prompt-tokens", args.prompt_tokens),
        gen_tokens=_int_option("--gen-tokens", args.gen_tokens),
        image=parse_image_size(args.image) if args.image else None,
        threads=_int_option("--threads", args.threads) if args.threads is not None else None,
        compare=parse_compare(args.compare),
        dtype=args.dtype,
        kernel=args.kernel,
        peer_dtype=args.peer_dtype,
        vision_config=args.vision_config,
        repeat=_int_option("--repeat", args.repeat),
        speculative=args.speculative,
        spec_tokens=_int_option("--spec-tokens", args.spec_tokens) if args.spec_tokens is not None else None,
    )


def _int_option(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise QwenVLError(f"{flag} {text!r}: expected a whole number") from None


def run_bench_command(args: argparse.Namespace) -> int:
    options = options_from_args(args).validate()
    records = run_bench(options, progress=lambda message: print(f"qwenvl bench: {message}", file=sys.stderr))
    print(json.dumps(records, indent=2, ensure_ascii=False) if args.json else format_table(records))
    return 0


# ----------------------------------------------------------------------------------------------
# Workers: one engine, in its own process


def worker_main(spec_path: str, result_path: str) -> int:
    run = EngineRun(**json.loads(Path(spec_path).read_text(encoding="utf-8")))
    try:
        figures = MEASURES[run.engine](run)
    except Exception as error:  # a peer's failure is reported, not raised
        first_line = (str(error).strip().splitlines() or [""])[0]
        result = {"status": "failed", "note": f"{type(error).__name__}: {first_line}"}
        code = 1
    else:
        result = {**figures, "status": "ok", "peak_rss_mb": peak_rss_mb()}
        code = 0
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")
    return code


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


@contextmanager
def _timer() -> Iterator[list[float]]:
    """``with _timer() as t: ...`` then ``t[0]`` is the seconds the block took."""
    box: list[float] = []
    start = time.perf_counter()
    yield box
    box.append(time.perf_counter() - start)


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def _text_figures(runs: list[tuple[float, float, int]], prompt_tokens: int) -> dict[str, Any]:
    """(prefill_s, decode_s, decoded tokens) per run → median figures."""
    prefill = [prompt_tokens / p for p, _, _ in runs]
    decode = [(n - 1) / d for _, d, n in runs if n > 1 and d > 0]
    return {
        "prefill_tok_s": _median(prefill),
        "decode_tok_s": _median(decode),
        "decoded_tokens": min(n for _, _, n in runs),
    }


def synthetic_image(size: tuple[int, int], seed: int) -> Any:
    """A noisy gradient of width x height pixels (every seed a different picture: no encoder cache hits)."""
    import numpy as np
    from PIL import Image

    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y + seed) % 256], axis=-1)
    noise = np.random.default_rng(seed).integers(0, 48, size=(height, width, 3))
    return Image.fromarray((base + noise).clip(0, 255).astype(np.uint8))


def _image_messages(image: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": TTFT_TEXT}]}]


# -- qwenvl --------------------------------------------------------------------------------------


def measure_qwenvl(run: EngineRun) -> dict[str, Any]:
    if run.vision_config:
        return _qwenvl_vision_only(run)
    from .api import load

    import_rss = current_rss_mb()
    with _timer() as load_s:
        # no prefix cache: every repeat prefills its whole prompt (benchmarks/prefix_cache.py measures the cache)
        model = load(
            run.model, dtype=run.dtype, threads=run.threads, mmproj=run.mmproj, kernel=run.kernel, prefix_cache=False
        )
    dtype = str(model.dtype).removeprefix("torch.")
    figures: dict[str, Any] = {"load_s": round(load_s[0], 3), "import_rss_mb": round(import_rss, 1), "dtype": dtype}
    figures["kernel_isa"] = _kernel_isa()
    _qwenvl_generate(model, run.prompt_ids[:WARMUP_PROMPT_TOKENS], 2)
    runs, plain, spec = [], [], []
    for _ in range(run.repeat):
        result = _qwenvl_generate(model, run.prompt_ids, run.gen_tokens)
        runs.append((result.prefill_s, result.decode_s, result.completion_tokens))
        plain.append(result)
        if run.speculative:  # alternating with the plain run, under the same load
            options = {"speculative": run.speculative, "spec_tokens": run.spec_tokens}
            spec.append(_qwenvl_generate(model, run.prompt_ids, run.gen_tokens, **options))
    figures.update(_text_figures(runs, len(run.prompt_ids)))
    if spec:
        figures.update(_speculative_figures(plain, spec, run.spec_tokens))
    if model.vision_model is not None and run.image:
        figures.update(_qwenvl_image_figures(model, run))
    return figures


def _kernel_isa() -> str:
    """The native kernels' path in use ("avx2", "avx512", ..., or "torch"), as ``qwenvl info`` names it."""
    from . import ops

    return ops.path()


def _speculative_figures(plain: list[Any], spec: list[Any], spec_tokens: int | None) -> dict[str, Any]:
    """bench --speculative: the speculative runs' median decode tok/s, its ratio to the plain runs'
    median, the acceptance rate (kept / drafted tokens) and whether every run gave plain's tokens."""
    from .engine.speculative import DEFAULT_TOKENS

    spec_rate, plain_rate = _median([r.decode_tok_s for r in spec]), _median([r.decode_tok_s for r in plain])
    drafted = sum(r.draft_tokens for r in spec)
    return {
        "spec_tokens": spec_tokens or DEFAULT_TOKENS,
        "spec_decode_tok_s": spec_rate,
        "spec_speedup": round(spec_rate / plain_rate, 3) if spec_rate and plain_rate else None,
        "spec_acceptance_rate": round(sum(r.accepted_tokens for r in spec) / drafted, 4) if drafted else None,
        "spec_identical": all(r.token_ids == plain[0].token_ids for r in spec),
    }


def _qwenvl_generate(model: Any, ids: list[int], tokens: int, **options: Any) -> Any:
    """Greedy, end-of-sequence ignored: exactly ``tokens`` tokens; the GenerationResult. ``options``:
    speculative decoding's."""
    generation = model.generate(ids, max_tokens=tokens, temperature=0.0, ignore_eos=True, **options)
    for _ in generation:
        pass
    return generation.result


def _qwenvl_image_figures(model: Any, run: EngineRun) -> dict[str, Any]:
    from .media.image import preprocess_image

    def encode(size: tuple[int, int], seed: int) -> float:
        image = preprocess_image(synthetic_image(size, seed), model.preprocess_config)
        with _timer() as seconds:
            _qwenvl_encode(model.vision_model, image)
        return seconds[0]

    encode(WARMUP_IMAGE, seed=0)
    encode_s = [encode(run.image, seed=1 + i) for i in range(run.repeat)]
    ttft_s = []
    for i in range(run.repeat):
        image = synthetic_image(run.image, seed=100 + i)  # unseen: the vision cache cannot answer
        with _timer() as seconds:
            generation = model.stream(_image_messages(image), max_tokens=1, temperature=0.0)
            for _ in generation:
                pass
        ttft_s.append(seconds[0])
    return {"image_encode_s": _median(encode_s), "ttft_s": _median(ttft_s)}


def _qwenvl_encode(vision: Any, image: Any) -> Any:
    import torch

    with torch.inference_mode():
        return vision(image.pixel_values.to(vision.dtype), [image.grid_thw])


def _qwenvl_vision_only(run: EngineRun) -> dict[str, Any]:
    import torch

    from .config import PreprocessConfig
    from .media.image import preprocess_image
    from .models.vision import VisionTransformer
    from .runtime import resolve_dtype, set_threads

    set_threads(run.threads)
    dtype = resolve_dtype(run.dtype)
    with torch.device("meta"):
        vision = VisionTransformer(published_vision_config(run.vision_config), dtype)
    vision = vision.to_empty(device="cpu")
    randomize_weights(vision)
    vision.eval()
    config = PreprocessConfig()

    def encode(size: tuple[int, int], seed: int) -> float:
        image = preprocess_image(synthetic_image(size, seed), config)
        with _timer() as seconds:
            _qwenvl_encode(vision, image)
        return seconds[0]

    encode(WARMUP_IMAGE, seed=0)
    seconds = [encode(run.image, seed=1 + i) for i in range(run.repeat)]
    return {"image_encode_s": _median(seconds), "dtype": str(dtype).removeprefix("torch.")}


def published_vision_config(name: str) -> Any:
    """The vision encoders of Qwen2-VL-2B-Instruct and Qwen2.5-VL-3B-Instruct (their config.json)."""
    from .config import VisionConfig

    if name == "qwen2-vl-2b":
        return VisionConfig(
            variant="qwen2_vl",
            depth=32,
            hidden_size=1280,
            num_heads=16,
            intermediate_size=5120,
            out_hidden_size=1536,
            hidden_act="quick_gelu",
        )
    return VisionConfig(
        variant="qwen2_5_vl",
        depth=32,
        hidden_size=1280,
        num_heads=16,
        intermediate_size=3420,
        out_hidden_size=2048,
        hidden_act="silu",
        window_size=112,
        fullatt_block_indexes=(7, 15, 23, 31),
        tokens_per_second=2,
    )


def randomize_weights(module: Any, seed: int = 0) -> None:
    """O(1) activations: norm weights near 1, biases near 0, matrices scaled by their fan-in."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.02 * noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)


# -- transformers ---------------------------------------------------------------------------------


def measure_transformers(run: EngineRun) -> dict[str, Any]:
    import torch

    torch.set_num_threads(run.threads)
    dtype = getattr(torch, run.dtype)
    if run.vision_config:
        return _transformers_vision_only(run, dtype)
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    is_vl = run.arch in ("qwen2_vl", "qwen2_5_vl")
    model_class = AutoModelForImageTextToText if is_vl else AutoModelForCausalLM
    import_rss = current_rss_mb()
    with _timer() as load_s:
        model = model_class.from_pretrained(run.model, dtype=dtype, attn_implementation="sdpa").eval()
    figures: dict[str, Any] = {"load_s": round(load_s[0], 3), "import_rss_mb": round(import_rss, 1), "dtype": run.dtype}
    _transformers_generate(model, run.prompt_ids[:WARMUP_PROMPT_TOKENS], 2)
    runs = [_transformers_generate(model, run.prompt_ids, run.gen_tokens) for _ in range(run.repeat)]
    figures.update(_text_figures(runs, len(run.prompt_ids)))
    if is_vl and run.image:
        figures.update(_transformers_image_figures(model, run, dtype))
    return figures


def _transformers_generate(model: Any, ids: list[int], tokens: int) -> tuple[float, float, int]:
    """Greedy, end-of-sequence ignored: (prefill_s, decode_s, tokens)."""
    import torch

    with torch.inference_mode():
        with _timer() as prefill_s:
            out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            token = out.logits[0, -1].argmax()
        with _timer() as decode_s:
            for _ in range(tokens - 1):
                out = model(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[0, -1].argmax()
    return prefill_s[0], decode_s[0], tokens


def _transformers_image_figures(model: Any, run: EngineRun, dtype: Any) -> dict[str, Any]:
    """Encode with model.model.visual; TTFT as transformers' own pieces build an image prompt
    (AutoProcessor needs torchvision: the tokenizer renders the chat template, Qwen2VLImageProcessorPil
    makes the pixels, each <|image_pad|> is expanded to t·h·w/4)."""
    import torch
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(run.model)
    processor = Qwen2VLImageProcessorPil(**_hf_pixel_limits(Path(run.model)))
    visual = model.model.visual

    def encode(size: tuple[int, int], seed: int) -> float:
        pixels = processor([synthetic_image(size, seed)], return_tensors="pt")
        with torch.inference_mode(), _timer() as seconds:
            visual(pixels["pixel_values"].to(dtype), grid_thw=pixels["image_grid_thw"])
        return seconds[0]

    encode(WARMUP_IMAGE, seed=0)
    encode_s = [encode(run.image, seed=1 + i) for i in range(run.repeat)]
    ttft_s = []
    for i in range(run.repeat):
        image = synthetic_image(run.image, seed=100 + i)
        with torch.inference_mode(), _timer() as seconds:
            inputs = _hf_image_inputs(tokenizer, processor, model.config, image)
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            out.logits[0, -1].argmax()
        ttft_s.append(seconds[0])
    return {"image_encode_s": _median(encode_s), "ttft_s": _median(ttft_s)}


def _hf_pixel_limits(directory: Path) -> dict[str, int]:
    config_file = directory / "preprocessor_config.json"
    if not config_file.is_file():
        return {}
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    return {key: int(raw[key]) for key in ("min_pixels", "max_pixels") if raw.get(key)}


def _hf_image_inputs(tokenizer: Any, processor: Any, config: Any, image: Any) -> dict[str, Any]:
    import torch

    text = tokenizer.apply_chat_template(_image_messages(image), tokenize=False, add_generation_prompt=True)
    pixels = processor([image], return_tensors="pt")
    grid = pixels["image_grid_thw"][0]
    before, after = text.split("<|image_pad|>", 1)
    ids = torch.tensor([tokenizer.encode(before + "<|image_pad|>" * int(grid.prod() // 4) + after)])
    kinds = (ids == config.image_token_id).int()
    return {
        "input_ids": ids,
        "pixel_values": pixels["pixel_values"],
        "image_grid_thw": pixels["image_grid_thw"],
        "mm_token_type_ids": kinds,
    }


def _transformers_vision_only(run: EngineRun, dtype: Any) -> dict[str, Any]:
    import torch

    from .config import PreprocessConfig
    from .media.image import preprocess_image

    visual = _transformers_vision_model(run.vision_config, dtype)
    config = PreprocessConfig()

    def encode(size: tuple[int, int], seed: int) -> float:
        image = preprocess_image(synthetic_image(size, seed), config)
        with torch.inference_mode(), _timer() as seconds:
            visual(image.pixel_values.to(dtype), grid_thw=torch.tensor([image.grid_thw]))
        return seconds[0]

    encode(WARMUP_IMAGE, seed=0)
    seconds = [encode(run.image, seed=1 + i) for i in range(run.repeat)]
    return {"image_encode_s": _median(seconds), "dtype": run.dtype}


def _transformers_vision_model(name: str, dtype: Any) -> Any:
    """transformers' own vision encoder of the published dims, its own random init, sdpa attention."""
    ours = published_vision_config(name)
    if ours.variant == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig as Config
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as Model

        config = Config(
            depth=ours.depth,
            embed_dim=ours.hidden_size,
            num_heads=ours.num_heads,
            mlp_ratio=ours.intermediate_size // ours.hidden_size,
            hidden_size=ours.out_hidden_size,
            hidden_act=ours.hidden_act,
        )
    else:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig as Config
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Model,
        )

        config = Config(
            depth=ours.depth,
            hidden_size=ours.hidden_size,
            num_heads=ours.num_heads,
            intermediate_size=ours.intermediate_size,
            out_hidden_size=ours.out_hidden_size,
            hidden_act=ours.hidden_act,
            window_size=ours.window_size,
            fullatt_block_indexes=list(ours.fullatt_block_indexes),
            tokens_per_second=int(ours.tokens_per_second),
        )
    config._attn_implementation = "sdpa"
    return Model._from_config(config, dtype=dtype).eval()


# -- llama.cpp ------------------------------------------------------------------------------------


def measure_llama_cpp(run: EngineRun) -> dict[str, Any]:
    import llama_cpp

    n_ctx = len(run.prompt_ids) + run.gen_tokens + 8
    import_rss = current_rss_mb()
    with _timer() as load_s, _no_extra_buffer_types():
        llm = llama_cpp.Llama(run.model, n_ctx=n_ctx, n_threads=run.threads, n_threads_batch=run.threads, verbose=False)
    figures: dict[str, Any] = {
        "load_s": round(load_s[0], 3),
        "import_rss_mb": round(import_rss, 1),
        "dtype": llm._model.desc(),
    }
    _llama_cpp_generate(llm, run.prompt_ids[:WARMUP_PROMPT_TOKENS], 2)
    runs = [_llama_cpp_generate(llm, run.prompt_ids, run.gen_tokens) for _ in range(run.repeat)]
    figures.update(_text_figures(runs, len(run.prompt_ids)))
    return figures


@contextmanager
def _no_extra_buffer_types() -> Iterator[None]:
    """Llama(...) takes its model params from llama_model_default_params() and has no argument for
    ``use_extra_bufts``: hand it defaults with that flag off while the model loads."""
    from llama_cpp import llama as high_level

    low_level = high_level.llama_cpp
    original = low_level.llama_model_default_params

    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = defaults
    try:
        yield
    finally:
        low_level.llama_model_default_params = original


def _llama_cpp_generate(llm: Any, ids: list[int], tokens: int) -> tuple[float, float, int]:
    """Greedy one-token evals, end-of-sequence ignored: (prefill_s, decode_s, tokens)."""
    import numpy as np

    vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))))

    llm.reset()
    with _timer() as prefill_s:
        llm.eval(ids)
        token = next_token()
    with _timer() as decode_s:
        for _ in range(tokens - 1):
            llm.eval([token])
            token = next_token()
    return prefill_s[0], decode_s[0], tokens


MEASURES: dict[str, Callable[[EngineRun], dict[str, Any]]] = {
    "qwenvl": measure_qwenvl,
    "transformers": measure_transformers,
    "llama.cpp": measure_llama_cpp,
}


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m qwenvl.bench --worker SPEC.json RESULT.json (run by `qwenvl bench`)")
    sys.exit(worker_main(sys.argv[2], sys.argv[3]))
