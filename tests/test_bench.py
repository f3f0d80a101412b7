"""`qwenvl bench`: functional checks on tiny checkpoints (the shape of what it reports, never its speed).

Every run starts real worker processes (qwenvl, transformers, llama.cpp when installed) with a few
prompt and generated tokens; the figures are only checked to be there, positive and consistent.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from qwenvl import bench
from qwenvl.cli import main as cli_main
from qwenvl.models.vision import weight_names
from qwenvl.ops import isa

JSON_KEYS = {"engine", "prefill_tok_s", "decode_tok_s", "image_encode_s", "ttft_s", "load_s", "peak_rss_mb"}
TINY = ["--prompt-tokens", "12", "--gen-tokens", "3", "--threads", "1"]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Exit status (argparse's errors exit through SystemExit), stdout, stderr."""
    try:
        code = cli_main(argv)
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def engine_rows(lines: list[str]) -> dict[str, list[str]]:
    """The table's per-engine rows (not the ratio rows), split into cells, by engine."""
    rows = [line.split() for line in lines[2:]]
    return {cells[0]: cells for cells in rows if len(cells) > 1 and cells[1] != "÷"}


@pytest.fixture(scope="module")
def text_records(make_qwen2, tmp_path_factory):
    """One `qwenvl bench --json` run on a tiny Qwen2 against both peers (llama.cpp on a converted copy)."""
    directory = make_qwen2()
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("cache")
        patch.setenv("QWENVL_CACHE", str(cache))
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = cli_main(["bench", str(directory), *TINY, "--compare", "transformers,llama.cpp", "--json"])
    assert code == 0
    return {"records": json.loads(out.getvalue()), "cache": cache}


def test_json_has_one_object_per_engine_with_the_issue_keys(text_records, make_qwen2):
    records = text_records["records"]
    assert [r["engine"] for r in records] == ["qwenvl", "transformers", "llama.cpp"]
    for record in records:
        assert JSON_KEYS <= set(record)
        assert record["threads"] == 1 and record["prompt_tokens"] == 12 and record["gen_tokens"] == 3
        assert record["image_encode_s"] is None and record["ttft_s"] is None  # a text-only model
    ours, peer, _ = records
    for record in (ours, peer):
        assert record["status"] == "ok", record["note"]
        assert all(record[key] > 0 for key in ("prefill_tok_s", "decode_tok_s", "load_s", "peak_rss_mb"))
        assert record["peak_rss_mb"] >= record["import_rss_mb"] > 0
        assert record["model_file_mb"] > 0
        assert record["other_cpu_cores"] >= 0  # Linux: the machine's busy time beyond the worker's
    assert ours["decoded_tokens"] == peer["decoded_tokens"] == 3  # end-of-sequence ignored
    assert ours["model"] == str(make_qwen2().resolve()) and peer["dtype"] == "bfloat16"
    assert ours["kernel_isa"] in (*isa.ISAS, "torch") and peer["kernel_isa"] is None


def test_ratio_is_qwenvl_over_peer(text_records):
    ours, peer, _ = text_records["records"]
    assert "ratio" not in ours
    assert set(peer["ratio"]) == {"prefill_tok_s", "decode_tok_s", "load_s", "peak_rss_mb"}
    for figure, ratio in peer["ratio"].items():
        assert ratio == pytest.approx(ours[figure] / peer[figure], rel=1e-2)


def test_llama_cpp_runs_on_a_converted_copy(text_records):
    pytest.importorskip("llama_cpp")
    record = text_records["records"][2]
    assert record["status"] == "ok", record["note"]
    assert record["decoded_tokens"] == 3 and record["prefill_tok_s"] > 0 and record["decode_tok_s"] > 0
    (converted,) = (text_records["cache"] / "bench").glob("*/*.gguf")
    assert record["model"] == str(converted) and "f16 conversion" in record["note"]
    assert set(record["ratio"]) == {"prefill_tok_s", "decode_tok_s", "load_s", "peak_rss_mb"}


def test_table_has_a_row_per_engine_and_the_ratios(text_records):
    records = text_records["records"]
    lines = bench.format_table(records).splitlines()
    assert lines[0].startswith("model: ") and "threads: 1" in lines[0] and "prompt: 12 tokens, 3 generated" in lines[0]
    assert lines[1].split()[:3] == ["engine", "prefill", "tok/s"]
    rows = engine_rows(lines)
    assert rows["qwenvl"][1] == f"{records[0]['prefill_tok_s']:.1f}"
    assert rows["transformers"][2] == f"{records[1]['decode_tok_s']:.2f}"
    assert rows["qwenvl"][3:5] == ["—", "—"]  # no image figures for a text model
    ratio_row = next(line for line in lines if line.startswith("qwenvl ÷ transformers"))
    assert ratio_row.split()[3] == f"{records[1]['ratio']['prefill_tok_s']:.2f}×"


def test_vl_model_reports_image_figures_and_skips_absent_peers(make_vl, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path))
    monkeypatch.setattr(bench, "peer_installed", lambda engine: False)
    argv = ["bench", str(make_vl()), *TINY, "--image", "84x56", "--compare", "llama.cpp,transformers", "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    ours, *skipped = json.loads(out)
    assert ours["status"] == "ok" and ours["image"] == "84x56"
    assert ours["image_encode_s"] > 0 and ours["ttft_s"] > 0
    assert ours["prefill_tok_s"] > 0 and ours["decode_tok_s"] > 0
    assert [r["engine"] for r in skipped] == ["llama.cpp", "transformers"]
    for record, package in zip(skipped, ["llama-cpp-python", "transformers"]):
        assert record["status"] == "skipped" and record["note"] == f"{package} is not installed"
        assert all(record[figure] is None for figure in bench.FIGURES) and record["ratio"] is None
    table = bench.format_table([ours, *skipped])
    assert engine_rows(table.splitlines())["llama.cpp"][1] == "skipped"
    assert "llama.cpp: llama-cpp-python is not installed" in table


def test_a_worker_that_fails_is_reported_not_raised(tmp_path):
    pytest.importorskip("llama_cpp")
    run = bench.EngineRun(
        engine="llama.cpp",
        model=str(tmp_path / "missing.gguf"),
        mmproj=None,
        arch="qwen2",
        prompt_ids=[1, 2, 3],
        gen_tokens=2,
        image=None,
        threads=1,
        dtype="bfloat16",
        vision_config=None,
        repeat=1,
    )
    result = bench.run_worker(run)
    assert result["status"] == "failed" and "missing.gguf" in result["note"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--prompt-tokens", "0"], "--prompt-tokens must be at least 1"),
        (["--gen-tokens", "1"], "--gen-tokens must be at least 2"),
        (["--prompt-tokens", "many"], "--prompt-tokens 'many': expected a whole number"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--image", "448"], "expected WIDTHxHEIGHT"),
        (["--image", "0x448"], "expected WIDTHxHEIGHT"),
        (["--compare", "transformers,vllm"], "--compare 'vllm'"),
        (["--vision-config", "qwen9"], "--vision-config 'qwen9'"),
        (["--dtype", "float8"], "--dtype 'float8'"),
        (["--peer-dtype", "auto"], "--peer-dtype 'auto'"),
        (["--repeat", "0"], "--repeat must be at least 1"),
        (["some-model-dir", "--vision-config", "qwen2-vl-2b"], "it takes no MODEL"),
        (["--spec-tokens", "3"], "--spec-tokens goes with --speculative"),
        (["--speculative", "eagle"], "--speculative 'eagle': the method is ngram"),
        (["--speculative", "--spec-tokens", "16"], "--spec-tokens must be in 1 … 15, got 16"),
        (["--speculative", "--vision-config", "qwen2-vl-2b"], "--speculative measures text decoding"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--threads"], "--threads: expected one argument"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, fragment, capsys):
    code, out, err = run_cli(["bench", *argv], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and fragment in err, err


def test_image_size_on_a_text_model_is_an_error(make_qwen2, capsys):
    code, out, err = run_cli(["bench", str(make_qwen2()), "--image", "448x448"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "text-only model" in err


def test_prompt_ids_are_exactly_the_requested_count(make_qwen2):
    from qwenvl.weights.checkpoint import open_checkpoint

    encode = open_checkpoint(make_qwen2()).tokenizer.encode
    one = encode(bench.PROMPT_TEXT)
    for count in (1, len(one), len(one) + 5, 3 * len(one)):
        ids = bench.prompt_token_ids(encode, count)
        assert len(ids) == count and ids == (one * 4)[:count]


@pytest.mark.parametrize("name", bench.VISION_CONFIG_NAMES)
def test_published_vision_configs_have_the_same_tensors_in_both_engines(name):
    with torch.device("meta"):
        hf = bench._transformers_vision_model(name, torch.bfloat16)
    shapes = {key: tuple(value.shape) for key, value in hf.state_dict().items()}
    ours = bench.published_vision_config(name)
    assert sorted(shapes) == sorted(weight_names(ours))
    assert shapes["merger.mlp.2.weight"] == (ours.out_hidden_size, 4 * ours.hidden_size)
    assert sum(1 for key in shapes if key.endswith("attn.qkv.weight")) == ours.depth == 32


def test_speculative_reports_speed_acceptance_and_sameness(make_qwen2, capsys):
    """bench --speculative: plain and speculative runs alternate; the JSON keys and the table line."""
    argv = ["bench", str(make_qwen2()), "--prompt-tokens", "40", "--gen-tokens", "24", "--threads", "1"]
    code, out, _ = run_cli([*argv, "--speculative", "--spec-tokens", "4", "--repeat", "2", "--json"], capsys)
    assert code == 0
    record = json.loads(out)[0]
    assert record["spec_tokens"] == 4 and record["spec_identical"] is True
    assert record["spec_decode_tok_s"] > 0 and record["spec_speedup"] > 0
    rate = record["spec_acceptance_rate"]
    assert rate is None or 0 <= rate <= 1
    code, out, _ = run_cli([*argv, "--speculative"], capsys)
    assert code == 0
    assert "qwenvl --speculative ngram --spec-tokens 5: decode" in out and "same tokens as plain: yes" in out
