"""The benchmark without a GPU: arithmetic, targets, tables, child processes, and the whole
app-vs-raw driver run end to end against a FakeEngine that sleeps per token."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from legal_eagle.bench import cli, load, markdown, report
from legal_eagle.bench.child import process_consumers, run_child
from legal_eagle.bench.markdown import format_table
from legal_eagle.bench.parts import fixed_length_kwargs, kv_blocks
from legal_eagle.bench.report import RequestResult, evaluate_targets, summarise
from legal_eagle.config import Settings
from legal_eagle.engines.base import SamplingParams
from legal_eagle.engines.fake import FakeEngine

N = 60  # tokens per answer in the end-to-end runs


def long_answer(messages: Any, params: SamplingParams) -> str:
    """Always longer than max_new_tokens, so every answer is exactly N tokens (like ignore_eos)."""
    return "很" * 10_000


def summary(
    agg: float | None = None, decode: float | None = None, ttft: float | None = None
) -> dict[str, Any]:
    return {"agg_tok_s": agg, "decode_tok_s_mean": decode, "ttft_ms_mean": ttft}


def test_summarise_aggregate_is_all_tokens_over_first_send_to_last_output() -> None:
    results = [
        RequestResult(0, 10.0, 12.0, 100, 0.05, 50.0),
        RequestResult(1, 10.5, 14.0, 200, 0.15, 60.0),
        RequestResult(2, 11.0, 11.5, 7, None, None, error="boom"),
    ]
    s = summarise(results, users=3)
    assert s["tokens"] == 307 and s["wall_s"] == pytest.approx(4.0)
    assert s["agg_tok_s"] == pytest.approx(307 / 4.0)
    assert s["errors"] == 1 and s["error_examples"] == ["boom"]
    assert s["ttft_ms_mean"] == pytest.approx(100.0) and s["ttft_ms_max"] == pytest.approx(150.0)
    assert s["decode_tok_s_mean"] == pytest.approx(55.0) and s["decode_tok_s_min"] == pytest.approx(50.0)


def test_summarise_of_nothing_has_no_speed() -> None:
    s = summarise([], users=4)
    assert s["agg_tok_s"] is None and s["ttft_ms_mean"] is None and s["requests"] == 0


def test_format_table_pads_columns_into_a_markdown_table() -> None:
    text = format_table(("a", "long header"), [(1, "x"), ("wide cell", 2.5)])
    lines = text.splitlines()
    assert lines[0] == "| a         | long header |"
    assert lines[1] == "|-----------|-------------|"
    assert lines[2] == "| 1         | x           |"
    assert len({len(line) for line in lines}) == 1


def passing_results() -> dict[str, Any]:
    return {
        "serve_awq": {
            "raw": {"1": summary(decode=130.0, ttft=18.0), "32": summary(agg=3000.0)},
            "app": {"1": summary(decode=125.0, ttft=60.0), "32": summary(agg=2500.0)},
            "page": {"32": summary(agg=2700.0)},
            "long8": summary(agg=900.0),
            "settings": {"concurrency_limit": 32},
        },
        "serve_hf": {"raw": {"1": summary(decode=150.0, ttft=15.0)}},
        "prefix_on": {"turns": [{"turn": 1, "ttft_ms": 34.0}] + [{"turn": 10, "ttft_ms": 50.0}]},
        "prefix_off": {"turns": [{"turn": 1, "ttft_ms": 34.0}, {"turn": 10, "ttft_ms": 244.0}]},
        "kv8g_q8": {"peak_bytes": 7 * report.GIB, "long8": {**summary(agg=800.0), "errors": 0}},
        "kv8g_q4": {"peak_bytes": 9 * report.GIB, "long8": {**summary(agg=700.0), "errors": 0}},
        "warm": {"total_s": 20.0},
        "cold": {"total_s": 200.0},
    }


def test_targets_pass_fail_and_ratios_from_given_numbers() -> None:
    targets = {t.number: t for t in evaluate_targets(passing_results())}
    assert targets[1].verdict == "PASS" and targets[1].ratio == pytest.approx(125 / 130)
    assert targets[2].verdict == "PASS" and targets[2].ratio == pytest.approx(2500 / 3000)
    assert "page protocol: 2,700 tok/s (0.90 x raw)" in targets[2].measured
    assert targets[3].verdict == "PASS" and targets[3].ratio == pytest.approx(50 / 34)
    assert targets[4].verdict == "PASS" and targets[4].ratio == pytest.approx(7 / 8)
    assert "q8: 7.00 GiB, 800 tok/s (0.89 x app settings)" in targets[4].measured
    assert targets[5].verdict == "PASS" and targets[5].ratio == pytest.approx(20 / 30)
    assert targets[6].verdict == "FAIL" and targets[6].ratio == pytest.approx(130 / 150)


def test_target_3_is_judged_on_the_chat_with_the_engines_own_answers_when_the_run_has_it() -> None:
    results = passing_results()
    results["prefix_on"]["turns"][-1]["ttft_ms"] = 80.0  # fixed-text history: 2.35 x, would fail
    results["prefix_on"]["own_turns"] = [{"turn": 1, "ttft_ms": 20.0, "prompt_tokens": 254, "cached_tokens": 0},
                                         {"turn": 10, "ttft_ms": 24.0, "prompt_tokens": 4076,
                                          "cached_tokens": 3904}]
    target = {t.number: t for t in evaluate_targets(results)}[3]
    assert target.verdict == "PASS" and target.ratio == pytest.approx(24 / 20)
    assert "3,904 of 4,076 prompt tokens cached" in target.measured and "turn 10 80 ms" in target.measured
    results["prefix_on"]["own_turns"][-1]["ttft_ms"] = 30.1
    assert {t.number: t for t in evaluate_targets(results)}[3].verdict == "FAIL"
    table = markdown.prefix_table(results)
    assert "own answers: prompt tokens" in table and "| 3,904 " in table
    results["prefix_on_auto"] = {"own_turns": [{"turn": 1, "ttft_ms": 20.0}, {"turn": 10, "ttft_ms": 32.0}]}
    target = {t.number: t for t in evaluate_targets(results)}[3]
    assert "cache_generation auto (LMDeploy's default): turn 1 20 ms, last 32 ms (1.60 x)" in target.measured
    assert target.ratio == pytest.approx(30.1 / 20)  # judged on the app's own setting, not the comparison


@pytest.mark.parametrize(
    ("path", "value", "number"),
    [
        (("serve_awq", "app", "1", "ttft_ms_mean"), 68.1, 1),  # decode fine, TTFT 50.1 ms over raw
        (("serve_awq", "app", "1", "decode_tok_s_mean"), 123.0, 1),  # 0.946 of raw
        (("serve_awq", "app", "32", "agg_tok_s"), 2399.0, 2),
        (("prefix_on", "turns"), [{"ttft_ms": 34.0}, {"ttft_ms": 51.1}], 3),
        (("kv8g_q8", "peak_bytes"), 8 * report.GIB + 1, 4),
        (("cold", "total_s"), 241.0, 5),
    ],
)
def test_each_target_fails_just_past_its_threshold(path: tuple[str, ...], value: Any, number: int) -> None:
    results = passing_results()
    node = results
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert {t.number: t.verdict for t in evaluate_targets(results)}[number] == "FAIL"


def test_targets_of_parts_not_run_are_na() -> None:
    targets = evaluate_targets({"warm": {"total_s": 12.0}})
    assert [t.verdict for t in targets] == ["n/a"] * 6
    assert evaluate_targets({"warm": {"total_s": 31.0}})[4].verdict == "FAIL"  # one half failing is a FAIL


def test_status_tokens_reads_the_chat_tabs_status_line() -> None:
    assert load.status_tokens("正在生成… 37 tokens ") == 37
    assert load.status_tokens("正在生成… ") == 0
    assert load.status_tokens("回答完成 · 256 tokens · 首字 20 ms · 131.5 tokens/s") == 256
    assert load.status_tokens(None) == 0


def test_a_burst_is_not_a_decode_speed() -> None:
    burst = load.Trace(t0=0.0, events=[(0.40, 5), (0.401, 100), (0.402, 256)])
    assert burst.result(0).decode_tok_s is None and burst.result(0).n_tokens == 256
    steady = load.Trace(t0=0.0, events=[(0.02, 1), (0.07, 7), (1.07, 137)])
    assert steady.result(0).decode_tok_s == pytest.approx(130.0)


def test_kv_share_for_eight_4k_chats(tmp_path: Path) -> None:
    from legal_eagle.bench.parts import kv_share
    from legal_eagle.engines.turbomind import kv_bytes_per_token

    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 32, "num_key_value_heads": 8,
                                                      "hidden_size": 4096, "num_hidden_layers": 32}))
    assert kv_bytes_per_token(tmp_path, 0) == 128 * 1024  # InternLM2-7B: 128 KiB a token in fp16
    assert kv_bytes_per_token(tmp_path, 8) == int(64 * 1024 * 1.05)
    need = kv_blocks(8, 4096) * 64 * kv_bytes_per_token(tmp_path, 8)  # ~2.1 GiB
    share = kv_share(need, free_bytes=140 * 2**30, weights_bytes=5 * 2**30)
    assert 0 < share < 1 and share * (140 - 5 - 2) * 2**30 == pytest.approx(need)
    with pytest.raises(ValueError, match="do not fit"):
        kv_share(need, free_bytes=8 * 2**30, weights_bytes=5 * 2**30)


def test_page_protocol_status_diffs() -> None:
    status = load.apply_string_diff("", "正在生成… ")  # the first update carries the whole value
    status = load.apply_string_diff(status, [["append", [], "1 tokens "]])
    assert load.status_tokens(status) == 1
    status = load.apply_string_diff(status, [["replace", [], "正在生成… 12 tokens "], ["append", [0], "x"]])
    assert status == "正在生成… 12 tokens " and load.apply_string_diff(status, []) == status


def test_page_request_reads_the_apps_event_stream(launch: Any) -> None:
    """A page-protocol user against the real app: tokens from the status line, errors from the app."""
    import httpx

    client = launch(FakeEngine(script=long_answer, delay_s=0.005))
    http = httpx.Client(timeout=30)
    fn = load.fn_index(http, client.src)
    ok = load.page_request(http, client.src, fn, "公司拖欠工资怎么办？", "律师", SamplingParams(max_new_tokens=N))
    assert ok.error is None and ok.n_tokens == N and ok.ttft_s is not None and ok.decode_tok_s
    bad = load.page_request(http, client.src, fn, "   ", "律师", SamplingParams(max_new_tokens=N))
    assert bad.n_tokens == 0 and bad.error and "问题" in bad.error  # the app's Chinese refusal


def test_a_page_user_is_one_tab_whose_later_rounds_carry_its_history(launch: Any) -> None:
    engine = FakeEngine(script=long_answer, delay_s=0.001)
    client = launch(engine)
    results = load.page_level_results(client.src, ["第一问", "第二问"], "律师", SamplingParams(max_new_tokens=N),
                                      users=2, rounds=2)
    assert len(results) == 4 and all(r.error is None and r.n_tokens == N for r in results)
    histories = sorted(len(call.messages) for call in engine.calls)
    assert histories == [2, 2, 4, 4]  # system + question; then system + the first turn + question


def test_fixed_length_asks_for_exactly_max_new_tokens() -> None:
    kwargs = fixed_length_kwargs(SamplingParams(max_new_tokens=128, greedy=True), [2, 92542])
    assert kwargs["ignore_eos"] is True and kwargs["max_new_tokens"] == 128
    assert kwargs["do_sample"] is False


def test_kv_blocks_for_eight_4k_chats() -> None:
    assert kv_blocks(8, 4096) == 512
    assert kv_blocks(8, 4100) == 8 * 65


@pytest.mark.slow
def test_compare_raw_and_app_end_to_end_with_fake_engine() -> None:
    engine = FakeEngine(script=long_answer, delay_s=0.005)
    settings = Settings(host="127.0.0.1", port=load.free_port(), concurrency_limit=8)
    params = SamplingParams(max_new_tokens=N, greedy=True)
    out = load.compare(
        engine,
        settings,
        questions=["公司拖欠工资怎么办？", "房东不退押金怎么办？"],
        persona="律师",
        params=params,
        levels=[1, 4],
        rounds={1: 2, 4: 1},
    )
    for side in ("raw", "app"):
        one, four = out[side]["1"], out[side]["4"]
        assert (one["requests"], four["requests"], one["errors"], four["errors"]) == (2, 4, 0, 0)
        assert one["tokens"] == 2 * N and four["tokens"] == 4 * N
        assert 0 < one["ttft_ms_mean"] < 2000 and 50 < one["decode_tok_s_mean"] < 1000  # fake: ~200 tok/s
    assert out["app"]["4"]["ttft_ms_mean"] >= 0
    page = out["page"]["1"]  # the page's own protocol, at every level
    assert set(out["page"]) == {"1", "4"} and (page["requests"], page["errors"], page["tokens"]) == (2, 0, 2 * N)
    assert 0 < page["ttft_ms_mean"] < 2000 and 50 < page["decode_tok_s_mean"] < 1000
    assert engine.peak_active >= 2  # the 4-user levels really ran streams at once (no timing needed)
    asked = [c.messages for c in engine.calls]
    assert all(m[0] == {"role": "system", "content": "律师"} for m in asked)
    assert engine.active_generations() == 0


@pytest.mark.slow
def test_app_users_in_a_child_process(settings: Settings) -> None:
    engine = FakeEngine(script=long_answer, delay_s=0.002)
    params = SamplingParams(max_new_tokens=N, greedy=True)
    with load.running_app(engine, settings) as url:
        results = process_consumers(url, ["问题"], "律师", params, users=3, rounds=1, processes=2)
    assert len(results) == 3 and all(r.error is None and r.n_tokens == N for r in results)
    assert {r.user for r in results} == {0, 1, 2}  # 2 + 1 users in two processes, distinct indices
    starts = sorted(r.start for r in results)  # perf_counter is system-wide (CLOCK_MONOTONIC) on Linux
    assert starts[-1] - starts[0] < 0.5 * min(r.end - r.start for r in results), starts  # started together


def test_consumer_processes_one_per_user_up_to_half_the_cores() -> None:
    from legal_eagle.bench.child import consumer_processes

    assert [consumer_processes(u, cores=16) for u in (1, 3, 8, 32)] == [1, 3, 8, 8]
    assert consumer_processes(32, cores=2) == 1 and consumer_processes(4, cores=1) == 1


def test_run_users_opens_the_gate_after_every_setup_and_before_any_request() -> None:
    events: list[str] = []
    lock = threading.Lock()

    def make_user(index: int):
        time.sleep(0.05 * index)
        with lock:
            events.append(f"setup {index}")

        def request(round_: int):
            with lock:
                events.append(f"request {index}")
            return RequestResult(index, 0.0, 0.0, 0, None, None, None)

        return request

    results = load.run_users(make_user, 3, 1, first_user=5, gate=lambda: events.append("gate"))
    assert sorted(r.user for r in results) == [5, 6, 7]
    assert events.index("gate") == 3 and sorted(events[:3]) == ["setup 5", "setup 6", "setup 7"]


def test_run_child_returns_the_parts_json_and_passes_env() -> None:
    data = run_child("selftest", {"echo": [1, "二"]}, timeout_s=60, env={"LE_BENCH_PROBE": "yes"})
    assert data == {"ok": True, "echo": [1, "二"], "probe": "yes"}


def test_run_child_reports_a_failing_part() -> None:
    data = run_child("no-such-part", {}, timeout_s=60)
    assert "KeyError" in data["error"] and data["exit_code"] == 1


def test_conversation_history_grows_by_one_exchange_a_turn() -> None:
    engine = FakeEngine()
    prompts = load.conversation(engine, "律师", turns=10, question_tokens=150, answer_tokens=250, seed=1)
    sizes = [engine.count_tokens(p) for p in prompts]
    assert len(prompts) == 10 and all(b > a for a, b in zip(sizes, sizes[1:], strict=False))
    for earlier, later in zip(prompts, prompts[1:], strict=False):
        assert later[: len(earlier)] == earlier  # turn k's prompt is a prefix of turn k+1's: cacheable
    assert 3600 <= sizes[-1] <= 4100
    ttfts = load.chat_ttfts(engine, prompts[:2], SamplingParams(max_new_tokens=4, greedy=True))
    assert [t["turn"] for t in ttfts] == [1, 2] and ttfts[1]["prompt_tokens"] == sizes[1]


def test_long_chats_are_distinct_and_near_the_token_target() -> None:
    engine = FakeEngine(script=long_answer)
    s, prompt_tokens = load.long_chats(
        engine, "律师", users=3, prompt_tokens=500, params=SamplingParams(max_new_tokens=5, greedy=True)
    )
    assert s["requests"] == 3 and s["tokens"] == 15 and 480 <= prompt_tokens <= 520
    contents = {c.messages[-1]["content"] for c in engine.calls}
    assert len(contents) == 3


def test_markdown_section_is_replaced_not_duplicated(tmp_path: Path) -> None:
    meta = {
        "gpu": "NVIDIA H100 80GB HBM3",
        "driver": "580.1",
        "versions": {"lmdeploy": "0.18.0"},
        "command": "python -m legal_eagle.bench --quick",
        "date": "today",
    }
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro by the lead\n", encoding="utf-8")
    markdown.write_section(doc, markdown.render_markdown(passing_results(), meta))
    markdown.write_section(doc, markdown.render_markdown(passing_results(), meta))
    text = doc.read_text(encoding="utf-8")
    assert text.count(markdown.BEGIN) == 1 and text.startswith("# Benchmarks\n\nintro by the lead")
    assert "NVIDIA H100 80GB HBM3" in text and "`python -m legal_eagle.bench --quick`" in text
    assert "| 6 " in text and "FAIL" in text and "PASS" in text
    assert "### Time to first token over a 10-turn chat" in text


def test_report_mode_merges_json_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    meta = {
        "gpu": "H100",
        "driver": "580",
        "versions": {},
        "command": "python -m legal_eagle.bench --parts cold",
    }
    first.write_text(json.dumps({"meta": meta, "results": {"cold": {"total_s": 200.0}}}))
    second.write_text(
        json.dumps(
            {
                "meta": {**meta, "command": "python -m legal_eagle.bench --parts warm"},
                "results": {"warm": {"total_s": 20.0}},
            }
        )
    )
    out = tmp_path / "bench.md"
    assert cli.main(["--report", str(first), str(second), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "warm 20.0 s, cold 200.0 s" in text and "| PASS" in text
    assert "--parts cold` + `python -m legal_eagle.bench --parts warm" in text
    assert "PASS" in capsys.readouterr().out


def test_run_parts_order_and_awq_dir_logic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_child(part: str, args: dict[str, Any], *, timeout_s: float, env: Any = None) -> dict[str, Any]:
        calls.append((part, args))
        if part == "make_fp8":  # as the real part does: a complete folder appears
            Path(args["fp8_dir"]).mkdir(parents=True)
            (Path(args["fp8_dir"]) / "config.json").write_text("{}")
        return {"method": "data-free AWQ"} if part == "quick_awq" else {}

    monkeypatch.setattr(cli, "run_child", fake_child)
    argv = [
        "--model-dir",
        str(tmp_path / "fp16"),
        "--work-dir",
        str(tmp_path / "w"),
        "--quick",
        "--parts",
        "serve,prefix,kv8g,warm,fp16",
    ]
    notes: list[str] = []
    cli.run_parts(cli.build_parser().parse_args(argv), {"serve", "prefix", "kv8g", "warm", "fp16"}, notes)
    assert [c[0] for c in calls] == ["quick_awq", "serve", "serve", "prefix", "prefix", "prefix", "kv8g", "warm"]
    assert calls[1][1]["dir"] == str((tmp_path / "w" / "awq").resolve()) and calls[1][1]["app"] is True
    assert calls[2][1]["format"] == "hf" and calls[2][1]["app"] is False
    assert [c[1]["enable_prefix_caching"] for c in calls[3:6]] == [True, True, False]
    assert [c[1]["cache_generation"] for c in calls[3:6]] == [None, "auto", None]  # None: the app's setting
    assert calls[6][1]["quant_policy"] == 8 and calls[6][1]["session_len"] == 4096
    assert any("data-free" in n for n in notes)
    calls.clear()
    cli.run_parts(cli.build_parser().parse_args([*argv[:-2], "--parts", "cold,warm"]), {"cold", "warm"}, [])
    assert [c[0] for c in calls] == ["cold", "warm"]  # the cold start publishes the 4-bit weights itself
    assert calls[0][1]["out_dir"] == calls[1][1]["awq_dir"]
    calls.clear()
    tune = [*argv[:-2], "--parts", "tune", "--tune-variants", "g64,pytorch-awq,pytorch-fp16"]
    (tmp_path / "w" / "awq").mkdir(parents=True, exist_ok=True)
    (tmp_path / "w" / "awq" / "config.json").write_text("{}")
    cli.run_parts(cli.build_parser().parse_args(tune), {"tune"}, [])
    assert [c[0] for c in calls] == ["quick_awq", "tune", "tune", "tune"]  # g64 weights made first, once
    g64 = str((tmp_path / "w" / "awq-g64").resolve())
    assert calls[0][1]["group_size"] == 64 and calls[0][1]["awq_dir"] == g64 and calls[1][1]["dir"] == g64
    assert "group_size" not in calls[1][1]
    assert calls[2][1]["backend"] == "pytorch" and calls[2][1]["dir"] == str((tmp_path / "w" / "awq").resolve())
    assert calls[3][1]["backend"] == "pytorch" and calls[3][1]["format"] == "hf"
    calls.clear()
    packs = [*argv[:-2], "--parts", "tune", "--tune-variants", "pack-plain,pack-forced"]
    cli.run_parts(cli.build_parser().parse_args(packs), {"tune"}, [])
    # TurboMind's weight-pack knob reaches the child's environment (that is where TurboMind reads it)
    assert [c[1]["env"] for c in calls] == [{"TM_GEMM_WEIGHT_PACK": "0"}, {"TM_GEMM_WEIGHT_PACK": "1"}]
    assert all(c[1]["format"] == "awq" for c in calls)
    calls.clear()
    fp8 = [*argv[:-2], "--parts", "tune", "--tune-variants", "fp8-input,fp16-fp8-input,fp8,fp8"]
    cli.run_parts(cli.build_parser().parse_args(fp8), {"tune"}, [])
    assert [c[0] for c in calls] == ["tune", "tune", "make_fp8", "tune", "tune"]  # FP8 weights written once
    assert calls[0][1]["options"] == {"gemm_input_dtype": "float8_e4m3"} and calls[0][1]["format"] == "awq"
    assert calls[1][1]["options"] == {"gemm_input_dtype": "float8_e4m3"} and calls[1][1]["format"] == "hf"
    fp8_dir = str((tmp_path / "w" / "fp8").resolve())
    assert calls[2][1] == {"dir": str(tmp_path / "fp16"), "fp8_dir": fp8_dir}
    assert calls[3][1]["format"] == "fp8" and calls[3][1]["dir"] == fp8_dir


def test_unknown_part_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--parts", "serve,bogus", "--model-dir", "/nonexistent"]) == 2
    assert "bogus" in capsys.readouterr().err
    for flag in ("--tune-variants", "--kv-variants"):  # a misspelt variant stops before any GPU work
        assert cli.main(["--parts", "kv8g", "--model-dir", "/nonexistent", flag, "app,apps-again"]) == 2
        err = capsys.readouterr().err
        assert "apps-again" in err and "--kv-variants" in err


def test_help_lists_the_options() -> None:
    text = cli.build_parser().format_help()
    for flag in ("--model-dir", "--awq-dir", "--make-random-7b", "--parts", "--quick", "--out"):
        assert flag in text
    assert sys.executable  # child processes run with this interpreter


@pytest.fixture
def fake_loaded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """GPU parts run on CPU: ``parts.load_engine`` hands out a FakeEngine instead of TurboMind."""
    from legal_eagle.bench import parts

    loads: list[dict[str, Any]] = []

    def fake_load(args: Any, baseline: Any) -> tuple[Any, dict[str, Any]]:
        opts = parts.engine_settings(args)
        loads.append(opts)
        engine = FakeEngine(script=long_answer, delay_s=0.002, context_len=opts["session_len"])
        return engine, {"load_s": 0.5, "engine": {**opts, "model_format": args["format"]}}

    monkeypatch.setattr(parts, "load_engine", fake_load)
    return loads


@pytest.mark.slow
def test_serve_part_runs_every_side_with_the_apps_settings(fake_loaded: list[dict[str, Any]]) -> None:
    from legal_eagle.bench import parts

    out = parts.part_serve({"format": "awq", "dir": "/x", "max_new_tokens": N, "levels": [1, 2],
                            "requests_1user": 2, "rounds": 1, "app": True, "pipe": True, "long8": True,
                            "long_new_tokens": 8, "long_prompt_tokens": 300, "consumers": "thread"})
    assert fake_loaded == [parts.engine_settings({})]  # the app's own Settings defaults
    assert out["raw"]["2"]["tokens"] == out["app"]["2"]["tokens"] == 2 * N
    assert out["settings"]["concurrency_limit"] == Settings().concurrency_limit
    assert "pipe_error" in out  # a FakeEngine has no LMDeploy pipe under it
    assert out["long8"]["requests"] == 8 and out["long8"]["tokens"] == 64
    assert 280 <= out["long8_prompt_tokens"] <= 320
    assert out["page"]["1"]["tokens"] == 2 * N and set(out["page"]) == {"1", "2"}
    text = markdown.render_markdown({"serve_awq": out}, {"command": "x"})
    assert "| 4-bit AWQ | app (gradio_client) | 2 " in text and "| 4-bit AWQ | app (page protocol) | 1 " in text
    assert "page protocol: decode" in text  # target 1 also reports the page's figure


def test_prefix_and_tune_parts(fake_loaded: list[dict[str, Any]]) -> None:
    from legal_eagle.bench import parts

    out = parts.part_prefix({"format": "awq", "dir": "/x", "max_new_tokens": 4, "turns": 3,
                             "enable_prefix_caching": False, "question_tokens": 50, "answer_tokens": 80,
                             "conversations": 2})
    assert fake_loaded[-1]["enable_prefix_caching"] is False
    assert [t["turn"] for t in out["turns"]] == [1, 2, 3] and len(out["runs"]) == 2
    assert out["turns"][0]["prompt_tokens"] < out["turns"][2]["prompt_tokens"]
    tuned = parts.part_tune({"name": "mbs1", "format": "awq", "dir": "/x", "max_new_tokens": 100,
                             "requests": 2, "max_batch_size": 1, "env": {"TM_GEMM_TUNE": "x"}})
    assert fake_loaded[-1]["max_batch_size"] == 1 and tuned["max_batch_size"] == 1
    assert tuned["decode_tok_s"] > 0 and tuned["env"] == {"TM_GEMM_TUNE": "x"}


@pytest.mark.slow
def test_quick_awq_and_cold_start_on_a_tiny_checkpoint(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up parts for real on CPU (convert, the app's AWQ and sanity check), TurboMind faked."""
    import time

    from legal_eagle.bench import start
    from legal_eagle.tiny_model import build_tiny_checkpoint

    src = build_tiny_checkpoint(tmp_path / "internlm2", hidden_size=512, num_layers=2, num_heads=4,
                                num_kv_heads=2, intermediate_size=1024)
    quick = start.part_quick_awq({"dir": str(src), "work_dir": str(tmp_path / "w"),
                                  "awq_dir": str(tmp_path / "q")})
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert quick["method"] == "data-free AWQ" and config["quantization_config"]["bits"] == 4
    g64 = start.part_quick_awq({"dir": str(src), "work_dir": str(tmp_path / "w"), "awq_dir": str(tmp_path / "q64"),
                                "group_size": 64})
    config64 = json.loads((tmp_path / "q64" / "config.json").read_text())
    assert g64["method"] == "data-free AWQ" and config64["quantization_config"]["group_size"] == 64
    assert config["quantization_config"]["group_size"] == 128
    loaded: list[Path] = []

    def fake_load(awq_dir: Path, args: Any) -> FakeEngine:
        loaded.append(awq_dir)
        return FakeEngine(script=long_answer, delay_s=0.001)

    monkeypatch.setattr(start, "_load_awq", fake_load)
    cold = start.part_cold({"dir": str(src), "work_dir": str(tmp_path / "w"), "out_dir": str(tmp_path / "c"),
                            "calib_samples": 2, "spawn_time": time.time()})
    assert loaded == [tmp_path / "c"] and (tmp_path / "c" / "quant_manifest.json").is_file()
    assert cold["quantization"]["calibration_samples"] == 2 and cold["sanity"]["passed"] is True
    assert cold["stages"]["convert InternLM2 -> Llama"] > 0 and cold["stages"]["first token"] > 0
    assert cold["total_s"] == pytest.approx(sum(cold["stages"].values()))


def test_fp16_side_uses_the_apps_llama_conversion_when_it_is_of_this_model(tmp_path: Path) -> None:
    model, work = tmp_path / "m", tmp_path / "w"
    (work / "llama").mkdir(parents=True)
    marker = work / "llama" / "legal_eagle_conversion.json"
    assert cli.fp16_dir(model, work) == model
    marker.write_text(json.dumps({"source": str(tmp_path / "other")}))
    assert cli.fp16_dir(model, work) == model
    marker.write_text(json.dumps({"source": str(model.resolve())}))
    assert cli.fp16_dir(model, work) == work / "llama"


def test_main_saves_after_every_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[list[str]] = []
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"

    def fake_child(part: str, args: dict[str, Any], *, timeout_s: float, env: Any = None) -> dict[str, Any]:
        if out_json.is_file():
            seen.append(sorted(json.loads(out_json.read_text())["results"]))
        return {"total_s": 12.0} if part == "warm" else {"error": "no GPU here"}

    monkeypatch.setattr(cli, "run_child", fake_child)
    argv = ["--model-dir", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--parts", "kv8g,warm",
            "--quick", "--json", str(out_json), "--out", str(out_md)]
    assert cli.main(argv) == 0
    assert seen == [["quick_awq"], ["kv8g_q8", "quick_awq"]]  # each part saved before the next began
    data = json.loads(out_json.read_text())
    assert data["results"]["warm"] == {"total_s": 12.0} and "--parts kv8g,warm" in data["meta"]["command"]
    text = out_md.read_text()
    assert "kv8g_q8: no GPU here" in text and "### Parts that failed" in text
    assert "warm 12.0 s" in capsys.readouterr().out


def test_http_timeline_reports_each_request_and_restores_httpx() -> None:
    import httpx

    lines: list[str] = []
    original = httpx.Client.send
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={}))
    with load.http_timeline(lines.append), httpx.Client(transport=transport) as http:
        http.post("http://app/gradio_api/queue/join", json={})
        http.get("http://app/config")
    assert [line.split(" sent ")[0] for line in lines] == ["http POST /gradio_api/queue/join", "http GET /config"]
    assert all(" headers +" in line and line.endswith(" ms") for line in lines)
    assert httpx.Client.send is original


def test_kv8g_variants_over_kv_policies_and_prefill_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(cli, "run_child", lambda part, args, *, timeout_s, env=None: calls.append((part, args)) or {})
    (tmp_path / "w" / "awq").mkdir(parents=True)
    (tmp_path / "w" / "awq" / "config.json").write_text("{}")
    argv = ["--model-dir", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w"), "--parts", "kv8g",
            "--kv-policies", "8,4", "--kv-prefill", "4096,1024"]
    results = cli.run_parts(cli.build_parser().parse_args(argv), {"kv8g"}, [])
    assert list(results) == ["kv8g_q8", "kv8g_q8_p1024", "kv8g_q4", "kv8g_q4_p1024"]
    assert [(c[1]["quant_policy"], c[1]["max_prefill_token_num"]) for c in calls] == [
        (8, 4096), (8, 1024), (4, 4096), (4, 1024)]


def test_kv8g_memory_variants_pass_their_env_and_knobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any], Any]] = []
    monkeypatch.setattr(cli, "run_child",
                        lambda part, args, *, timeout_s, env=None: calls.append((part, args, env)) or {})
    (tmp_path / "w" / "awq").mkdir(parents=True)
    (tmp_path / "w" / "awq" / "config.json").write_text("{}")
    argv = ["--model-dir", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w"), "--parts", "kv8g",
            "--kv-policies", "4", "--kv-prefill", "256", "--kv-variants", "plain,export,lean"]
    results = cli.run_parts(cli.build_parser().parse_args(argv), {"kv8g"}, [])
    assert list(results) == ["kv8g_q4_p256", "kv8g_q4_p256_export", "kv8g_q4_p256_lean"]
    plain, export, lean = calls
    assert plain[2] is None and "env" not in plain[1] and "trim_pools" not in plain[1]
    cache = str((tmp_path / "w").resolve() / "gemm-kv8g.cache")
    assert export[2]["TM_GEMM_EXPORT"] == cache and export[1]["env"] == export[2]
    assert lean[2] == {"TM_GEMM_IMPORT": cache}
    assert lean[1]["trim_pools"] is True and lean[1]["stack_limit"] == 512
    with pytest.raises(KeyError):
        cli.run_parts(cli.build_parser().parse_args(argv[:-1] + ["nonsense"]), {"kv8g"}, [])
    calls.clear()
    results = cli.run_parts(cli.build_parser().parse_args(argv[:-1] + ["app,app-again"]), {"kv8g"}, [])
    assert list(results) == ["kv8g_q4_p256_app", "kv8g_q4_p256_app-again"]
    tuning = str((tmp_path / "w").resolve() / "gemm-app")
    assert [(c[1]["app_load"], c[2]) for c in calls] == [(tuning, None), (tuning, None)]  # the app's own load
    calls.clear()
    cli.run_parts(cli.build_parser().parse_args(argv[:-1] + ["lean-all,lean-nocache"]), {"kv8g"}, [])
    lean_all, nocache = calls
    assert lean_all[1]["cache_generation"] == "all" and lean_all[2] == {"TM_GEMM_IMPORT": cache}
    assert nocache[2] == {"TM_GEMM_IMPORT": cache, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    assert nocache[1]["env"] == nocache[2] and nocache[1]["trim_pools"] is True
    calls.clear()
    cli.run_parts(cli.build_parser().parse_args(argv[:-1] + ["lean-chunk"]), {"kv8g"}, [])
    (chunk,) = calls
    assert chunk[1]["cache_chunk_size"] == 64 and chunk[2] == {"TM_GEMM_IMPORT": cache}
