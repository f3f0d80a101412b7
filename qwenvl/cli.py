"""Command line: parse, call the API, print. User errors exit 2 with one line on stderr."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from . import __version__, status
from .errors import QwenVLError

USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return USER_ERROR
    # status lines (qwenvl.status) for terminals only, and never with --json output; serve logs them always
    status.configure(args.handler is cmd_serve or (sys.stderr.isatty() and not getattr(args, "json", False)))
    try:
        return args.handler(args) or 0
    except QwenVLError as error:
        print(f"qwenvl: error: {error}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenvl", description="Run Qwen2-VL / Qwen2.5-VL / Qwen2 models on a CPU.")
    parser.add_argument("--version", action="version", version=f"qwenvl {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser("run", help="answer one prompt (streamed)", description="Answer one prompt, streamed.")
    _add_model_arguments(run)
    run.add_argument("-p", "--prompt", required=True, help="the user message ('-' reads standard input)")
    run.add_argument("--system", help="a system message")
    run.add_argument(
        "--raw",
        action="store_true",
        help="the prompt as-is, no chat template (BOS as the tokenizer's config asks): what base models need",
    )
    _add_media_arguments(run)
    _add_sampling_arguments(run)
    _add_output_arguments(run)
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    run.add_argument(
        "--boxes",
        metavar="OUT.png",
        help="write the (last) image with the boxes and points of the answer drawn on it (docs/grounding.md)",
    )
    run.set_defaults(handler=cmd_run)

    chat = commands.add_parser("chat", help="interactive multi-turn chat", description="Interactive chat REPL.")
    _add_model_arguments(chat)
    chat.add_argument("--system", help="a system message")
    _add_media_arguments(chat, repl=True)
    _add_sampling_arguments(chat)
    chat.set_defaults(handler=cmd_chat)

    tokenize = commands.add_parser(
        "tokenize",
        help="print the token ids of a text",
        description="Token ids (and pieces) of TEXT: no special tokens added, special-token text parsed.",
    )
    tokenize.add_argument(
        "words", nargs="+", metavar="[MODEL] TEXT", help="model (optional) and the text ('-' reads standard input)"
    )
    tokenize.add_argument("--json", action="store_true", help="print {ids, pieces} as JSON")
    tokenize.add_argument("--no-parse-special", action="store_true", help="encode special-token text as plain text")
    tokenize.add_argument("--tiktoken", metavar="FILE", help="the qwen.tiktoken of a qwen.cpp GGML file")
    tokenize.set_defaults(handler=cmd_tokenize)
    _add_file_commands(commands)
    _add_bench_command(commands)
    _add_serve_command(commands)
    return parser


def _add_file_commands(commands: Any) -> None:
    """convert / quantize / export / info (docs/convert.md, quantize.md, export.md, info.md)."""
    from .convert import MMPROJ_TYPES, QUANTIZE_TYPES

    convert = commands.add_parser(
        "convert",
        help="HF checkpoint / qwen.cpp file → GGUF (+ mmproj for VL models)",
        description="Write the text GGUF and, for Qwen2-VL / Qwen2.5-VL, the mmproj GGUF, as llama.cpp does; "
        "or a qwen.cpp GGML file (with --tiktoken) as a GGUF.",
    )
    convert.add_argument(
        "hf_dir", metavar="MODEL", help="checkpoint directory, hub id, Meta params.json directory or qwen.cpp .bin"
    )
    convert.add_argument("-o", "--out-dir", required=True, metavar="OUT_DIR", help="directory for the .gguf files")
    convert.add_argument(
        "--type",
        choices=QUANTIZE_TYPES,
        help="text model tensor type (default f16; a qwen.cpp file keeps its types; K-quants for qwen.cpp files only)",
    )
    convert.add_argument("--tiktoken", metavar="FILE", help="the qwen.tiktoken of a qwen.cpp GGML file")
    convert.add_argument("--mmproj-type", choices=MMPROJ_TYPES, help="mmproj type (default: f32/f16/q8_0 after --type)")
    convert.add_argument("--force", action="store_true", help="replace output files that exist")
    convert.set_defaults(handler=cmd_convert)

    quantize = commands.add_parser(
        "quantize", help="re-quantize a GGUF", description="Write IN.gguf's tensors in another type (text or mmproj)."
    )
    quantize.add_argument("input", metavar="IN.gguf")
    quantize.add_argument("output", metavar="OUT.gguf")
    quantize.add_argument("type", metavar="TYPE", choices=QUANTIZE_TYPES, help=", ".join(QUANTIZE_TYPES))
    quantize.add_argument("--force", action="store_true", help="replace OUT.gguf if it exists")
    quantize.set_defaults(handler=cmd_quantize)

    export = commands.add_parser(
        "export",
        help="GGUF → HF checkpoint; Llama → llama2.c",
        description="Dequantize a GGUF (and its mmproj) into an HF checkpoint (--format hf), or write a Llama "
        "model (HF, Meta or GGUF) as llama2.c's model.bin + tokenizer.bin (--format llama2c / llama2c-q8).",
    )
    export.add_argument("input", metavar="MODEL", help="IN.gguf (hf); a Llama HF / Meta directory or GGUF (llama2c)")
    export.add_argument(
        "--format",
        default="hf",
        choices=["hf", "llama2c", "llama2c-q8"],
        help="hf: an HF checkpoint directory (default); llama2c: run.c's fp32 file; llama2c-q8: runq.c's Q8_0 file",
    )
    export.add_argument("--mmproj", metavar="FILE", help="the vision GGUF of a Qwen2-VL / Qwen2.5-VL text GGUF")
    export.add_argument(
        "-o", "--out-dir", "--out", dest="out_dir", required=True, metavar="OUT", help="HF_DIR, or model.bin"
    )
    export.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="hf: weight dtype (default float32: the dequantized values exactly)",
    )
    export.add_argument("--seq-len", type=int, help="llama2c: the seq_len in the header (default: the model's context)")
    export.add_argument("--force", action="store_true", help="replace the output if it exists")
    export.set_defaults(handler=cmd_export)

    info = commands.add_parser("info", help="describe a model file", description="Architecture, size, types, tokens.")
    info.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="HF checkpoint dir, hub id, .gguf text model or mmproj (default: the embedded model)",
    )
    info.add_argument("--mmproj", metavar="FILE", help="the vision GGUF of a text GGUF")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=cmd_info)


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .convert import convert_hf, convert_qwencpp, summary_table
    from .weights.checkpoint import file_kind

    if file_kind(Path(args.hf_dir).expanduser()) == "qwen.cpp":
        if args.mmproj_type:
            raise QwenVLError("--mmproj-type: a qwen.cpp file is a text model, it has no vision projector")
        written = convert_qwencpp(
            args.hf_dir, args.tiktoken, args.out_dir, out_type=args.type, force=args.force, progress=sys.stderr.isatty()
        )
        print(summary_table(written))
        return 0
    if args.tiktoken:
        raise QwenVLError(f"--tiktoken goes with a qwen.cpp GGML file, and {args.hf_dir} is not one")
    written = convert_hf(
        args.hf_dir,
        args.out_dir,
        out_type=args.type or "f16",
        mmproj_type=args.mmproj_type,
        force=args.force,
        progress=sys.stderr.isatty(),
    )
    print("\n".join(summary_table(file) for file in written))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .convert import quantize_gguf, summary_table

    written = quantize_gguf(args.input, args.output, args.type, force=args.force, progress=sys.stderr.isatty())
    print(summary_table(written))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .weights.export import export_hf

    if args.format != "hf":
        from .weights.llama2c import describe, export_llama2c

        for flag, value in (("--mmproj", args.mmproj), ("--dtype", args.dtype)):
            if value:
                raise QwenVLError(f"{flag} goes with --format hf (llama2.c's files are float32 or Q8_0)")
        files = export_llama2c(
            args.input, args.out_dir, quantized=args.format == "llama2c-q8", seq_len=args.seq_len, force=args.force
        )
        print("\n".join(describe(files)))
        return 0
    if args.seq_len is not None:
        raise QwenVLError("--seq-len goes with --format llama2c / llama2c-q8")
    out = export_hf(
        args.input,
        args.out_dir,
        mmproj=args.mmproj,
        dtype=getattr(torch, args.dtype or "float32"),
        overwrite=args.force,
        progress=sys.stderr.isatty(),
    )
    print(_written_files(out))
    return 0


def _written_files(directory: Any) -> str:
    """The files of a written directory, one a line with its size, and their total (as convert prints)."""
    from pathlib import Path

    files = sorted(path for path in Path(directory).iterdir() if path.is_file())
    total = sum(path.stat().st_size for path in files)
    lines = [f"{path}  {path.stat().st_size / 2**20:,.1f} MB" for path in files]
    return "\n".join([*lines, f"{len(files)} files, {total / 2**20:,.1f} MB in {directory}"])


def cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, model_info

    if args.model is None:
        from .defaults import default_model_path

        args.model = default_model_path()
    info = model_info(args.model, mmproj=args.mmproj)
    print(json.dumps(info, ensure_ascii=False) if args.json else format_info(info))
    return 0


def _add_bench_command(commands: Any) -> None:
    """bench (docs/bench.md): its arguments and its run live in qwenvl.bench."""
    from .bench import add_bench_arguments

    bench = commands.add_parser(
        "bench",
        help="prefill / decode / image encode speed, vs transformers and llama.cpp",
        description="Prefill and decode tok/s, image encode and TTFT seconds, load time and peak RSS of qwenvl "
        "and of each installed peer (--compare) on the same model, each engine in its own process.",
    )
    add_bench_arguments(bench)
    bench.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench_command

    return run_bench_command(args)


def _add_serve_command(commands: Any) -> None:
    """serve (docs/serve.md): the OpenAI-compatible HTTP server (docs/scale-out.md: its --ray replicas)."""
    from .scaleout import add_ray_arguments

    serve = commands.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat, completions, images, videos, streaming)",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and a chat page at /; "
        "concurrent requests are decoded together (continuous batching).",
    )
    _add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("QWENVL_API_KEY"),
        help="require Authorization: Bearer KEY on /v1 routes; the chat page asks for it "
        "(default: $QWENVL_API_KEY, else none)",
    )
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (default 8)")
    _add_speculative_arguments(serve)
    serve.add_argument(
        "--prefill-weights",
        choices=["auto", "packed", "blocks"],
        default="auto",
        help="GGUF models: 'packed' keeps the layers' weights dequantized to bf16 for prompts "
        "(same results, faster prompts, +2 bytes per weight); 'blocks' dequantizes them per "
        "prompt; 'auto' (default) packs when that takes at most a quarter of the free memory",
    )
    serve.add_argument(
        "--max-tokens",
        type=int,
        default=512,
        dest="default_max_tokens",
        metavar="N",
        help="max_tokens of requests that give none (default 512, capped by the context)",
    )
    media = serve.add_argument_group("media sources (data: URIs are always accepted)")
    media.add_argument(
        "--allowed-local-media-path", metavar="DIR", help="accept file:// URLs naming files under DIR (default: none)"
    )
    media.add_argument(
        "--allowed-media-domains",
        metavar="D,...",
        help="fetch http(s) media from these hosts (*.example.com: subdomains too; default: none)",
    )
    media.add_argument(
        "--limit-mm-per-prompt",
        metavar="image=N,video=N",
        help="most images / videos in one request (default image=8,video=2)",
    )
    media.add_argument("--media-timeout", type=float, default=10.0, help="seconds for one media download (default 10)")
    media.add_argument("--max-media-mb", type=float, default=32.0, help="size cap of one media file (default 32)")
    _add_video_limit_arguments(media)
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="request body size cap, else 413 (default 32)")
    serve.add_argument(
        "--cors-origins",
        metavar="ORIGIN,...",
        help="let web pages from these origins call the server (e.g. http://localhost:3000; '*': any; default: none)",
    )
    serve.add_argument("--no-ui", action="store_true", help="do not serve the chat page at / (API only)")
    _add_connection_arguments(serve)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_ray_arguments(serve)
    serve.set_defaults(handler=cmd_serve)


def _add_connection_arguments(serve: argparse.ArgumentParser) -> None:
    """Deadlines and limits on connections and the request queue (docs/serve.md, "Limits")."""
    limits = serve.add_argument_group("connections and queue (every wait is bounded)")
    limits.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="close a connection whose request headers are not all in S seconds after its first byte (default 10)",
    )
    limits.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="answer 408 and close when a request body is not all in S seconds after its headers (default 60)",
    )
    limits.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=5.0,
        metavar="S",
        help="close an idle keep-alive connection after S seconds (default 5)",
    )
    limits.add_argument(
        "--limit-concurrency",
        type=int,
        default=256,
        metavar="N",
        help="answer 503 to new requests while N connections or requests are open (default 256)",
    )
    limits.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        metavar="N",
        help="requests waiting for a batch slot at most; more get a 429 with Retry-After (default 1024)",
    )
    limits.add_argument(
        "--queue-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="a request waiting longer than S seconds for a batch slot gets a 503 with Retry-After (default 120)",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .runtime import threads_note
    from .scaleout import check_ray_arguments
    from .server import bind_socket, run_server

    check_ray_arguments(args)
    settings = serve_settings(args)
    if args.ray:
        if not args.ray_address:  # a cluster's Serve proxy may hold the port already: checked when Ray is ours
            bind_socket(args.host, args.port).close()
        from .deploy import serve_on_ray  # imports Ray: only with --ray

        return serve_on_ray(args, settings)
    sock = bind_socket(args.host, args.port)  # before loading: a port in use fails at once
    try:
        print(f"qwenvl serve: {threads_note()}", file=sys.stderr)
        app, loaded = serve_app(args, settings)
        base = f"http://{args.host}:{args.port}"
        page = f"; chat page {base}/" if settings.ui else ""
        print(f"qwenvl serve: {loaded}; API {base}/v1{page}", file=sys.stderr)
        run_server(app, args.host, args.port, args.log_level, sock=sock)
    finally:
        sock.close()
    return 0


def serve_settings(args: argparse.Namespace):
    """The ServerSettings of the `qwenvl serve` flags (user errors raised here, before any loading)."""
    from pathlib import Path

    from .server import ServerSettings
    from .server.settings import local_media_root, parse_domains, parse_mm_limits

    positive = ("port", "max_batch", "default_max_tokens", "media_timeout", "max_media_mb", "max_body_mb",
                "header_timeout", "body_timeout", "timeout_keep_alive", "limit_concurrency", "max_queue",
                "queue_timeout")  # fmt: skip
    for name in positive:
        _check_positive(name, getattr(args, name))
    _speculation(args)
    video_limits = _video_limits(args)
    return ServerSettings(
        model_id=Path(args.model).name if args.model else _default_model_name(),
        api_key=args.api_key or None,
        max_body_bytes=int(args.max_body_mb * 2**20),
        default_max_tokens=args.default_max_tokens,
        allowed_local_media_path=local_media_root(args.allowed_local_media_path),
        allowed_media_domains=parse_domains(args.allowed_media_domains),
        mm_limits=parse_mm_limits(args.limit_mm_per_prompt),
        media_timeout=args.media_timeout,
        max_media_bytes=int(args.max_media_mb * 2**20),
        ui=not args.no_ui,
        cors_origins=_cors_origins(args.cors_origins),
        max_video_frames=video_limits["max_video_frames"],
        max_video_seconds=video_limits["max_video_seconds"],
        video_decode_timeout=video_limits["video_decode_timeout"],
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive_timeout=args.timeout_keep_alive,
        limit_concurrency=args.limit_concurrency,
        max_waiting=args.max_queue,
        queue_timeout=args.queue_timeout,
    )


def serve_app(args: argparse.Namespace, settings: Any) -> tuple[Any, str]:
    """Load the model as the `qwenvl serve` flags say and build the server app over it (also what every
    replica of `qwenvl serve --ray` runs); the app and a start-up note."""
    from .server import create_app

    model, load_s = _load(args)
    _warm_grammar_compiler(model)
    packed = _pack_prefill_weights(model, args.prefill_weights)
    app = create_app(model, settings, max_batch=args.max_batch, speculation=_speculation(args))
    return app, f"{settings.model_id} loaded in {load_s:.1f} s{packed}; {model.kv_pool.describe()}"


def _cors_origins(text: str | None) -> tuple[str, ...]:
    origins = tuple(part.strip().rstrip("/") for part in (text or "").split(",") if part.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise QwenVLError(f"--cors-origins: expected http(s)://host[:port] or '*', got {origin!r}")
    return origins


def _warm_grammar_compiler(model: Any) -> None:
    """Build llguidance's view of the vocabulary (~1.5 s) in the background, before the first request
    with a grammar needs it."""
    import threading

    threading.Thread(
        target=lambda: model.grammar_compiler.ll_tokenizer, name="qwenvl-grammar-warmup", daemon=True
    ).start()


def _pack_prefill_weights(model: Any, choice: str) -> str:
    """Pack the prompt weights as ``--prefill-weights`` asks; the note for the start-up line."""
    from .media.video import available_memory
    from .quant.model import pack_prefill_weights

    if choice == "blocks":
        return ""
    budget = (available_memory() or 0) // 4 if choice == "auto" else 1 << 62
    packed = pack_prefill_weights(model.text_model, budget)
    if not packed and choice == "packed":
        print(
            "qwenvl serve: --prefill-weights packed: nothing to pack (not a GGUF model with bf16 prompts, "
            "or no oneDNN in this torch)",
            file=sys.stderr,
        )
    return f", prompt weights packed ({packed / 2**20:.0f} MB)" if packed else ""


def _default_model_name() -> str:
    from pathlib import Path

    from .defaults import default_model_path

    return Path(default_model_path()).name


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        help="HF checkpoint dir, hub id, .gguf, qwen.cpp .bin or Meta params.json dir (default: the embedded model)",
    )
    parser.add_argument("--mmproj", metavar="FILE", help="the vision GGUF of a Qwen2-VL / Qwen2.5-VL text GGUF")
    parser.add_argument("--tiktoken", metavar="FILE", help="the qwen.tiktoken of a qwen.cpp GGML file")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="compute dtype")
    parser.add_argument("--threads", type=int, help="threads (default: physical cores)")
    parser.add_argument("--ctx", type=int, help="context length in tokens (default: the model's, at most 32768)")
    parser.add_argument(
        "--kernel",
        default="auto",
        choices=["auto", "blocks", "q8", "dense", "int8", "int4"],
        help="how GGUF weights run (default auto: kept in their format, exact block kernels; "
        "q8: prompts with int8-quantized activations, not exact; dense: dequantized at load; "
        "see docs/quantization-kernels.md)",
    )
    parser.add_argument(
        "--exact-prefill",
        action="store_true",
        help="bf16: multiply prompts by the exact quantized weights too (slower); with --kernel q8: "
        "no int8 activations",
    )
    parser.add_argument(
        "--kv-cache-mb",
        type=int,
        metavar="MB",
        help="KV cache budget in MiB, shared by all requests (default: a quarter of the free memory)",
    )
    parser.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="prefill every prompt whole (by default a prompt reuses the cached keys/values of a prefix "
        "it shares with earlier requests or chat turns; docs/engine.md)",
    )


def _add_media_arguments(parser: argparse.ArgumentParser, repl: bool = False) -> None:
    group = parser.add_argument_group("images")
    if not repl:
        group.add_argument(
            "--image",
            action="append",
            default=[],
            metavar="PATH|URL",
            help="an image for the prompt (repeatable; path, file://, data: or http(s) URL)",
        )
    group.add_argument("--min-pixels", type=int, help="override the model's min_pixels for image resizing")
    group.add_argument("--max-pixels", type=int, help="override the model's max_pixels for image resizing")
    videos = parser.add_argument_group("videos (sampling and sizing as qwen-vl-utils: see docs/video.md)")
    if not repl:
        videos.add_argument(
            "--video",
            action="append",
            default=[],
            metavar="PATH|DIR|URL",
            help="a video for the prompt (repeatable; a video file, a directory of frame images, or an http(s) URL)",
        )
    sampling = videos.add_mutually_exclusive_group()
    sampling.add_argument(
        "--fps", type=float, help="frames to sample per second (default 2); for frame directories: their rate"
    )
    sampling.add_argument("--nframes", type=int, help="sample this many frames instead (rounded to an even count)")
    videos.add_argument("--video-start", type=float, metavar="SECONDS", help="start of the segment to use")
    videos.add_argument("--video-end", type=float, metavar="SECONDS", help="end of the segment to use")
    videos.add_argument("--video-max-pixels", type=int, help="pixels per frame at most (default 768*28*28)")
    videos.add_argument(
        "--video-total-pixels",
        type=int,
        help="pixel budget of the whole clip, shared by its frames (default 128000*28*28*0.9)",
    )
    _add_video_limit_arguments(videos)


def _add_video_limit_arguments(group: Any) -> None:
    """How much of a video may be decoded (docs/video.md): refused before decoding when over."""
    from .media.limits import MAX_VIDEO_FRAMES, MAX_VIDEO_SECONDS, VIDEO_DECODE_TIMEOUT

    group.add_argument(
        "--max-video-frames",
        type=int,
        default=MAX_VIDEO_FRAMES,
        metavar="N",
        help=f"refuse a video with more frames to decode (to the end of the part used; default {MAX_VIDEO_FRAMES})",
    )
    group.add_argument(
        "--max-video-seconds",
        type=float,
        default=MAX_VIDEO_SECONDS,
        metavar="S",
        help=f"refuse a video longer than this (to the end of the part used; default {MAX_VIDEO_SECONDS:g})",
    )
    group.add_argument(
        "--video-decode-timeout",
        type=float,
        default=VIDEO_DECODE_TIMEOUT,
        metavar="S",
        help=f"give up decoding one video after S seconds (default {VIDEO_DECODE_TIMEOUT:g})",
    )


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults: the model's generation_config.json)")
    group.add_argument("-n", "--max-tokens", type=int, default=512, help="most tokens to generate (default 512)")
    group.add_argument("--temperature", type=float, help="0 = greedy")
    group.add_argument("--top-p", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--min-p", type=float)
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--seed", type=int)
    group.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    _add_speculative_arguments(parser)


def _add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding (docs/speculative.md)")
    group.add_argument(
        "--speculative",
        choices=["ngram"],
        help="ngram: draft tokens by prompt lookup (copying from the prompt and the answer so far) and verify "
        "them in one step; the same answer (greedy: the same tokens), faster when the answer repeats its context",
    )
    group.add_argument(
        "--spec-tokens",
        type=int,
        metavar="K",
        help="with --speculative: tokens drafted per step at most (default 5, 1 … 15)",
    )


def _speculation(args: argparse.Namespace) -> Any:
    """The --speculative / --spec-tokens flags checked (a one-line error naming the flag): a
    ``speculative.Speculation``, or None."""
    from .engine import speculative

    if args.spec_tokens is not None and args.speculative is None:
        raise QwenVLError("--spec-tokens goes with --speculative ngram")
    if args.spec_tokens is not None and not 1 <= args.spec_tokens <= speculative.MAX_TOKENS:
        raise QwenVLError(f"--spec-tokens must be in 1 … {speculative.MAX_TOKENS}, got {args.spec_tokens}")
    return speculative.speculation(args.speculative, args.spec_tokens)


SAMPLING_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
                    "speculative", "spec_tokens")  # fmt: skip


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("constrained output (docs/run.md)")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument("--json-schema", metavar="FILE", help="the answer is JSON following this schema file")
    exclusive.add_argument("--regex", metavar="R", help="the answer matches this regular expression")
    exclusive.add_argument(
        "--tools", metavar="FILE", help="a JSON list of OpenAI function tools the model may call (printed as JSON)"
    )
    group.add_argument(
        "--tool-choice",
        metavar="auto|required|none|NAME",
        help="with --tools: auto (default), required (at least one call), none, or a tool name (exactly that call)",
    )


def _output_options(args: argparse.Namespace) -> dict[str, Any]:
    """Model.stream options for --json-schema / --regex / --tools / --tool-choice."""
    if args.tool_choice is not None and args.tools is None:
        raise QwenVLError("--tool-choice goes with --tools")
    if args.json_schema is not None:
        return {"json_schema": _read_json_file(args.json_schema, "--json-schema", dict)}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.tools is not None:
        choice = args.tool_choice or "auto"
        if choice not in ("auto", "required", "none"):
            choice = {"type": "function", "function": {"name": choice}}
        return {"tools": _read_json_file(args.tools, "--tools", list), "tool_choice": choice}
    return {}


def _read_json_file(path: str, flag: str, kind: type) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except OSError as error:
        raise QwenVLError(f"{flag}: cannot read {path} ({error.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise QwenVLError(f"{flag}: {path} is not valid JSON ({error})") from None
    if not isinstance(value, kind):
        raise QwenVLError(f"{flag}: {path} must hold a JSON {'object' if kind is dict else 'list'}")
    return value


def _check_media_flags(args: argparse.Namespace) -> None:
    """Flag values refused before the model loads."""
    from .media.image import check_pixel_range

    try:
        check_pixel_range(args.min_pixels, args.max_pixels)
    except QwenVLError as error:
        raise QwenVLError(f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}") from error
    for name in ("min_pixels", "max_pixels"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise QwenVLError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "speculative": args.speculative,
        "spec_tokens": args.spec_tokens,
        "min_pixels": args.min_pixels,
        "max_pixels": args.max_pixels,
        "fps": args.fps,
        "nframes": args.nframes,
        "video_start": args.video_start,
        "video_end": args.video_end,
        "video_max_pixels": args.video_max_pixels,
        "video_total_pixels": args.video_total_pixels,
        **_video_limits(args),
    }


def _video_limits(args: argparse.Namespace) -> dict[str, Any]:
    limits = {
        "max_video_frames": args.max_video_frames,
        "max_video_seconds": args.max_video_seconds,
        "video_decode_timeout": args.video_decode_timeout,
    }
    for name, value in limits.items():
        _check_positive(name, value)
    return limits


def _check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise QwenVLError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def _load(args: argparse.Namespace):
    from .api import load

    started = time.perf_counter()
    model = load(
        args.model,
        dtype=args.dtype,
        threads=args.threads,
        context=args.ctx,
        mmproj=args.mmproj,
        kernel=args.kernel,
        exact_prefill=args.exact_prefill,
        tiktoken=args.tiktoken,
        kv_cache_mb=args.kv_cache_mb,
        prefix_cache=not args.no_prefix_cache,
    )
    return model, time.perf_counter() - started


def _messages(system: str | None, user_content: Any) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user_content}]


def _user_content(text: str, images: list[Any], videos: list[str] | None = None) -> str | list[dict[str, Any]]:
    """Plain text, or the images, then the videos, then the text, as the Qwen-VL examples put them."""
    if not images and not videos:
        return text
    media = [{"type": "image", "image": image} for image in images]
    media += [{"type": "video", "video": video} for video in videos or []]
    return media + [{"type": "text", "text": text}]


def _read_prompt(prompt: str) -> str:
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        raise QwenVLError("empty prompt (-p)")
    return text


def cmd_run(args: argparse.Namespace) -> int:
    from .tools import ToolCallParser, parse_tool_calls, tool_names

    prompt = _read_prompt(args.prompt)
    _check_media_flags(args)
    _speculation(args)
    if args.raw:
        chat_only = set(_sampling(args)) - set(SAMPLING_OPTIONS) - set(_video_limits(args))  # limits: defaults
        media = {k.replace("_", "-"): v for k, v in _sampling(args).items() if k in chat_only}
        flags = {"system": args.system, "image": args.image, "video": args.video, "boxes": args.boxes, **media}
        for flag, value in flags.items():
            if value:
                raise QwenVLError(f"--{flag} needs the chat template, and --raw takes the prompt as-is: drop one")
    images: list[Any] = list(args.image)
    if args.boxes is not None:
        images = _images_to_draw_on(args.boxes, images)
    output = _output_options(args)
    model, load_s = _load(args)
    if args.raw:
        if output:
            raise QwenVLError("--raw takes the text as-is: --json-schema, --regex and --tools need the chat format")
        sampling = {k: v for k, v in _sampling(args).items() if k in SAMPLING_OPTIONS}
        generation = model.generate(model.prepare_raw(prompt), **sampling)
    else:
        messages = _messages(args.system, _user_content(prompt, images, args.video))
        generation = model.stream(messages, **_sampling(args), **output)
    names = tool_names(output.get("tools")) if output.get("tools") and output.get("tool_choice") != "none" else None
    parser = ToolCallParser(bare_names=names) if names is not None else None
    if args.json:
        for _ in generation:
            pass
    else:
        written = False
        for piece in generation:
            written |= _write(parser.feed(piece) if parser is not None else piece)
        if parser is not None:
            written |= _write(parser.finish(generation.result.finish_reason if generation.result else None))
        if written or parser is None:
            sys.stdout.write("\n")
    result = generation.result
    if parser is not None and not args.json:
        for call in parser.calls if not parser.malformed else []:
            print(json.dumps({"name": call.name, "arguments": json.loads(call.arguments)}, ensure_ascii=False))
    if args.json:
        record = _result_json(result, load_s, model.source)
        if "tools" in output and output["tool_choice"] != "none":
            content, calls, _ = parse_tool_calls(result.text, result.finish_reason, bare_names=names)
            record["content"], record["tool_calls"] = content, [call.to_openai() for call in calls]
            if calls and result.finish_reason == "stop":
                record["finish_reason"] = "tool_calls"
        print(json.dumps(record, ensure_ascii=False))
    if args.boxes is not None:
        _write_boxes(args.boxes, images, result)
    return 0


def _write(piece: Any) -> bool:
    """Text, or the content deltas of the tool-call parser (the calls are printed at the end)."""
    text = piece if isinstance(piece, str) else "".join(delta.content or "" for delta in piece)
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
    return bool(text)


def _images_to_draw_on(out: str, sources: list[str]) -> list[Any]:
    """--boxes: check OUT before the model loads, and load the images once (EXIF-rotated RGB: the same
    pixels the preprocessing would read from the files) so that the boxes are drawn on what the model saw."""
    from pathlib import Path

    from .grounding import check_output_image
    from .media.image import load_image

    if not sources:
        raise QwenVLError("--boxes needs an --image to draw on")
    check_output_image(out)
    target = Path(out).resolve()
    for source in sources:
        if Path(source).resolve() == target:
            raise QwenVLError(f"--boxes {out}: that is an input image; give another file name")
    return [load_image(source) for source in sources]


def _write_boxes(out: str, images: list[Any], result) -> None:
    from .grounding import draw_boxes, save_image

    boxes = result.boxes
    image = images[boxes[0].image] if boxes else images[-1]
    save_image(draw_boxes(image, boxes), out)
    if boxes:
        clamped = sum(box.clamped for box in boxes)
        note = f" ({clamped} clamped to the image)" if clamped else ""
        print(f"qwenvl: {len(boxes)} box(es) drawn on image {boxes[0].image + 1}{note}: {out}", file=sys.stderr)
    else:
        print(f"qwenvl: no boxes or points in the answer; {out} is the image unmarked", file=sys.stderr)


def _result_json(result, load_s: float, source: str) -> dict[str, Any]:
    return {
        "model": source,
        "text": result.text,
        "tokens": result.token_ids,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
        "images": [image.to_json() for image in result.images],
        "boxes": [box.to_json() for box in result.boxes],
        "timings": {
            "load_s": round(load_s, 4),
            "prefill_s": round(result.prefill_s, 4),
            "decode_s": round(result.decode_s, 4),
            "prefill_tok_s": round(result.prefill_tok_s, 2),
            "decode_tok_s": round(result.decode_tok_s, 2),
        },
        **_speculative_json(result),
    }


def _speculative_json(result) -> dict[str, Any]:
    """--json with --speculative: the drafted and kept tokens ({} without speculation)."""
    if not result.draft_tokens:
        return {}
    rate = result.accepted_tokens / result.draft_tokens
    return {"speculative": {"draft_tokens": result.draft_tokens, "accepted_tokens": result.accepted_tokens,
                            "acceptance_rate": round(rate, 4)}}  # fmt: skip


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .weights.checkpoint import open_checkpoint

    if len(args.words) > 2:
        raise QwenVLError("tokenize takes [MODEL] TEXT: quote the text")
    model_name, text = args.words if len(args.words) == 2 else (None, args.words[0])
    if text == "-":
        text = sys.stdin.read()
    if model_name is None:
        from .defaults import default_model_path

        model_name = default_model_path()
    tokenizer = open_checkpoint(model_name, tiktoken=args.tiktoken).tokenizer
    ids = tokenizer.encode(text, parse_special=not args.no_parse_special)
    pieces = tokenizer.pieces(ids)
    if args.json:
        print(json.dumps({"ids": ids, "pieces": pieces}, ensure_ascii=False))
    else:
        for token_id, piece in zip(ids, pieces):
            print(f"{token_id:6d} -> {piece!r}")
    return 0


CHAT_HELP = (
    "commands: /image PATH, /video PATH (attach an image / a video to your next message), "
    "/reset (forget the conversation), "
    "/quit (or Ctrl-D); Ctrl-C stops an answer"
)


def cmd_chat(args: argparse.Namespace) -> int:
    _check_media_flags(args)
    _speculation(args)
    model, _ = _load(args)
    history: list[dict[str, Any]] = _messages(args.system, "")[:-1]
    system_turns = list(history)
    attached: list[str] = []
    attached_videos: list[str] = []
    print(f"qwenvl chat — {model.source} ({model.kv_pool.describe()})\n{CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history, attached, attached_videos = list(system_turns), [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.split()[0] in ("/image", "/video"):
            kind, _, path = text.partition(" ")
            kind = kind[1:]
            problem = _attachment_problem(model, kind, path.strip())
            if problem:
                print(problem, file=sys.stderr)
            else:
                (attached if kind == "image" else attached_videos).append(path.strip())
                print(f"({kind} attached to your next message: {path.strip()})", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {CHAT_HELP}", file=sys.stderr)
            continue
        turn = {"role": "user", "content": _user_content(line, attached, attached_videos)}
        answer = _chat_turn(model, history + [turn], args)
        if answer is not None:
            history += [turn, {"role": "assistant", "content": answer}]
        attached, attached_videos = [], []


def _attachment_problem(model: Any, kind: str, source: str) -> str | None:
    """Why ``/image`` or ``/video`` SOURCE cannot be attached (checked when typed), or None."""
    from pathlib import Path

    from .media.image import load_image

    if not source:
        return f"usage: /{kind} PATH"
    if model.vision_model is None:
        return f"qwenvl: error: {model.no_vision_message()}"
    if source.startswith(("http://", "https://", "data:")):
        return None
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.exists():
        return f"qwenvl: error: {kind} file not found: {source}"
    if kind == "image":
        try:
            load_image(source)
        except QwenVLError as error:
            return f"qwenvl: error: {error}"
    return None


def _chat_turn(model, messages: list[dict[str, Any]], args: argparse.Namespace) -> str | None:
    """Stream one answer; Ctrl-C ends it early and keeps what was said so far. None on a user error."""
    pieces: list[str] = []
    try:
        for piece in model.stream(messages, **_sampling(args)):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    except QwenVLError as error:
        print(f"\nqwenvl: error: {error}", file=sys.stderr)
        return None
    sys.stdout.write("\n")
    return "".join(pieces)
