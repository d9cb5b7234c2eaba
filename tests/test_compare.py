"""fp16 vs 4-bit comparison with two fake engines: modes, figures, agreement, batch CSV and the tab."""

from __future__ import annotations

import csv
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import pytest

from legal_eagle.compare import (
    Contender,
    FakeProvider,
    agreement,
    batch_table,
    load_questions,
    run_batch,
    run_comparison,
    shared_params,
    table_columns,
    write_csv,
)
from legal_eagle.config import Settings
from legal_eagle.engines.base import Chunk, Message, SamplingParams
from legal_eagle.engines.fake import FakeEngine
from legal_eagle.metrics import StreamTimer
from legal_eagle.planner import Plan
from legal_eagle.prompts import load_prompts
from legal_eagle.service import ModelService
from legal_eagle.ui.compare_tab import CompareHandlers, build_compare_tab

Q: list[Message] = [{"role": "user", "content": "公司拖欠工资怎么办？"}]
GREEDY = SamplingParams(max_new_tokens=256, greedy=True)
ANSWER_A = "根据《中华人民共和国劳动合同法》第三十八条，劳动者可以解除劳动合同。"
ANSWER_B = "依据《劳动合同法》第38条，可以解除合同，并按第四十六条要求经济补偿。"


def side(key: str, engine: FakeEngine, memory: int | None = None) -> Contender:
    return Contender(key, key, engine, Q, (lambda: memory) if memory is not None else None)


def test_concurrent_mode_really_alternates() -> None:
    left = FakeEngine(script=lambda m, p: "甲" * 20, name="fp16")
    right = FakeEngine(script=lambda m, p: "乙" * 20, name="awq")
    order, right_tokens_when_left_steps = [], []
    for snap in run_comparison(side("left", left), side("right", right), GREEDY, "concurrent"):
        if not snap.done:
            order.append(snap.last_side)
            if snap.last_side == "left" and right.calls:
                right_tokens_when_left_steps.append((left.calls[0].tokens, right.calls[0].tokens))
    assert order[:40] == ["left", "right"] * 20
    assert all(abs(a - b) <= 1 for a, b in right_tokens_when_left_steps)  # both advance in lockstep
    assert snap.done and snap.left.text == "甲" * 20 and snap.right.text == "乙" * 20


def test_sequential_mode_runs_one_side_then_the_other() -> None:
    left, right = FakeEngine(script=lambda m, p: ANSWER_A), FakeEngine(script=lambda m, p: ANSWER_B)
    steps = run_comparison(side("left", left), side("right", right), GREEDY)
    order = [s.last_side for s in steps if not s.done]
    switch = order.index("right")
    assert set(order[:switch]) == {"left"} and set(order[switch:]) == {"right"}
    order = [s.last_side for s in run_comparison(side("left", left), side("right", right), GREEDY,
                                                 first="right") if not s.done]
    assert order[0] == "right" and order[-1] == "left"


class ClockedEngine(FakeEngine):
    """A fake engine on a manual clock: the first token after ``ttft`` s, then one per ``step`` s."""

    def __init__(self, clock: list[float], ttft: float, step: float, text: str) -> None:
        super().__init__(script=lambda m, p: text)
        self.clock, self.ttft, self.step = clock, ttft, step

    def stream(self, messages: Sequence[Message], params: SamplingParams) -> Iterator[Chunk]:
        inner = super().stream(messages, params)
        first = True
        for chunk in inner:
            if chunk.text:
                self.clock[0] += self.ttft if first else self.step
                first = False
            yield chunk


def test_figures_are_exact_on_a_manual_clock() -> None:
    clock = [100.0]
    fp16 = ClockedEngine(clock, ttft=0.015, step=0.005, text="甲" * 51)  # 200 tok/s
    awq = ClockedEngine(clock, ttft=0.020, step=0.010, text="乙" * 31)  # 100 tok/s
    snaps = list(run_comparison(side("left", fp16, 18 * 10**9), side("right", awq, 9 * 10**9), GREEDY,
                                timer=lambda: StreamTimer(clock=lambda: clock[0])))
    final = snaps[-1]
    assert final.left.ttft_s == pytest.approx(0.015) and final.right.ttft_s == pytest.approx(0.020)
    assert final.left.decode_tok_s == pytest.approx(200.0)
    assert final.right.decode_tok_s == pytest.approx(100.0)
    assert (final.left.output_tokens, final.right.output_tokens) == (51, 31)
    assert final.left.total_s == pytest.approx(0.015 + 50 * 0.005)
    assert (final.left.gpu_memory_bytes, final.right.gpu_memory_bytes) == (18 * 10**9, 9 * 10**9)
    assert final.left.finish_reason == final.right.finish_reason == "stop"


@pytest.mark.slow
def test_real_time_figures_and_shared_bandwidth_in_concurrent_mode() -> None:
    def pair() -> tuple[Contender, Contender]:
        return (side("left", FakeEngine(script=lambda m, p: "甲" * 30, delay_s=0.01)),
                side("right", FakeEngine(script=lambda m, p: "乙" * 30, delay_s=0.03)))

    alone = list(run_comparison(*pair(), GREEDY, "sequential"))[-1]
    assert alone.left.ttft_s == pytest.approx(0.01, abs=0.02)
    assert alone.left.decode_tok_s == pytest.approx(100, rel=0.3)
    assert alone.right.decode_tok_s == pytest.approx(33.3, rel=0.3)
    together = list(run_comparison(*pair(), GREEDY, "concurrent"))[-1]
    assert together.left.decode_tok_s == pytest.approx(25, rel=0.3)  # each waits for the other's step
    assert together.left.decode_tok_s < alone.left.decode_tok_s / 2
    assert together.mode == "concurrent" and alone.mode == "sequential"


def test_agreement_on_known_strings() -> None:
    same = agreement(ANSWER_A, ANSWER_A)
    assert same.char_similarity == 1.0 and same.common_prefix_chars == len(ANSWER_A) and same.same_citations
    abc = agreement("abc", "abd")
    assert abc.char_similarity == pytest.approx(2 * 2 / 6, abs=1e-4) and abc.common_prefix_chars == 2
    differ = agreement(ANSWER_A, ANSWER_B)  # 第三十八条 and 第38条 are the same article
    assert differ.citations_left == {("劳动合同法", "第三十八条")}
    assert differ.citations_right == {("劳动合同法", "第三十八条"), ("劳动合同法", "第四十六条")}
    assert not differ.same_citations and differ.citation_jaccard == pytest.approx(0.5)
    none = agreement("没有引用法条。", "也没有。")
    assert none.same_citations and none.citation_jaccard is None
    assert agreement("", "").char_similarity == 1.0


def test_one_side_failing_does_not_stop_the_other() -> None:
    broken = FakeEngine(script=lambda m, p: ANSWER_A, fail_after=3)
    for mode in ("sequential", "concurrent"):
        other = FakeEngine(script=lambda m, p: ANSWER_B)
        final = list(run_comparison(side("left", broken), side("right", other), GREEDY, mode))[-1]  # type: ignore[arg-type]
        assert final.left.finish_reason == "error" and final.left.error and len(final.left.text) == 3
        assert final.right.text == ANSWER_B and final.done and final.agreement is not None


def test_closing_a_comparison_aborts_both_engines() -> None:
    left = FakeEngine(script=lambda m, p: "甲" * 500)
    right = FakeEngine(script=lambda m, p: "乙" * 500)
    steps = run_comparison(side("left", left), side("right", right), GREEDY, "concurrent")
    for _ in range(10):
        next(steps)
    steps.close()
    assert left.active_generations() == right.active_generations() == 0
    assert left.calls[0].finish_reason == right.calls[0].finish_reason == "abort"


def test_sampled_comparison_shares_one_seed() -> None:
    sampled = shared_params(SamplingParams(greedy=False))
    assert sampled.seed is not None and shared_params(sampled).seed == sampled.seed
    assert shared_params(GREEDY).seed is None
    left, right = FakeEngine(), FakeEngine()
    list(run_comparison(side("left", left), side("right", right), sampled))
    assert left.calls[0].params == right.calls[0].params == sampled


def test_shipped_questions_and_question_file_rules(tmp_path: Path) -> None:
    questions = load_questions()
    assert 10 <= len(questions) <= 20 and all(q.endswith("？") for q in questions)
    path = tmp_path / "q.txt"
    path.write_text("# 注释\n\n 问题一？ \n问题二？\n", encoding="utf-8")
    assert load_questions(path) == ["问题一？", "问题二？"]
    path.write_text("# 只有注释\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_questions(path)


def test_batch_alternates_order_and_writes_csv(tmp_path: Path) -> None:
    started: list[str] = []

    class Recording(FakeEngine):
        def stream(self, messages: Sequence[Message], params: SamplingParams) -> Iterator[Chunk]:
            started.append(self.name)
            return super().stream(messages, params)

    fp16 = Recording(script=lambda m, p: ANSWER_A, name="fp16")
    awq = Recording(script=lambda m, p: ANSWER_A if "一" in m[-1]["content"] else ANSWER_B, name="awq")

    def contenders(question: str) -> tuple[Contender, Contender]:
        msgs: list[Message] = [{"role": "user", "content": question}]
        return Contender("fp16", "fp16", fp16, msgs), Contender("awq", "4-bit", awq, msgs)

    rows = list(run_batch(["问题一？", "问题二？", "问题三？"], contenders, GREEDY))
    assert started == ["fp16", "awq", "awq", "fp16", "fp16", "awq"]  # no order bias in sequential runs
    assert [r.agreement.char_similarity == 1.0 for r in rows] == [True, False, False]
    out = write_csv(rows, tmp_path / "batch.csv")
    assert out.read_bytes().startswith(b"\xef\xbb\xbf")  # BOM: spreadsheets read the Chinese
    with out.open(encoding="utf-8-sig", newline="") as handle:
        lines = list(csv.reader(handle))
    header, body, total = lines[0], lines[1:-1], lines[-1]
    assert header == table_columns() and len(body) == 3
    col = {name: i for i, name in enumerate(header)}
    assert body[1][col["question"]] == "问题二？" and body[0][col["same_citations"]] == "是"
    assert body[1][col["awq_citations"]] == "《劳动合同法》第三十八条；《劳动合同法》第四十六条"
    assert total[col["no"]] == "总计" and total[col["same_citations"]] == "1/3"
    assert int(total[col["fp16_output_tokens"]]) == 3 * len(ANSWER_A)
    assert int(total[col["awq_output_tokens"]]) == len(ANSWER_A) + 2 * len(ANSWER_B)
    sims = [float(r[col["char_similarity"]]) for r in body]
    assert float(total[col["char_similarity"]]) == pytest.approx(sum(sims) / 3, abs=1e-4)
    assert len(batch_table(rows)[0]) == len(header)


def test_fake_provider_counts_loads_when_not_resident() -> None:
    provider = FakeProvider(FakeEngine(), memory=5, resident=False)
    for _ in range(2):
        with provider.acquire() as engine:
            assert provider.held_bytes() == 5 and isinstance(engine, FakeEngine)
    assert (provider.loads, provider.releases, provider.held_bytes()) == (2, 2, None)


# ---- the tab, launched in its own Blocks and driven through gradio_client ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tab() -> Iterator[Callable[..., Any]]:
    from gradio_client import Client

    demos: list[gr.Blocks] = []

    def _launch(fp16: FakeEngine, awq: FakeEngine, provider: Any = None) -> tuple[Any, Any]:
        provider = provider or FakeProvider(fp16, memory=18 * 10**9)
        handlers = CompareHandlers(ModelService.ready_with(awq), provider, Settings(max_input_chars=200),
                                   load_prompts(), questions=["问题一？", "问题二？"],
                                   chat_memory=lambda: 9 * 10**9)
        with gr.Blocks() as demo:
            build_compare_tab(handlers)
        demo.queue()
        demos.append(demo)
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True,
                                quiet=True, show_error=True)
        return Client(url, verbose=False), provider

    yield _launch
    for demo in demos:
        demo.close()


SETTINGS = ("您是一个专业的律师。", "sequential", True, 0.7, 0.8, 256, -1)


def _text(content: Any) -> str:
    return "".join(p.get("text", "") for p in content) if isinstance(content, list) else str(content)


def test_tab_compares_multi_turn_with_separate_histories(tab: Callable[..., Any]) -> None:
    fp16 = FakeEngine(name="fp16", script=lambda m, p: f"甲答{sum(x['role'] == 'user' for x in m)}")
    awq = FakeEngine(name="awq", script=lambda m, p: f"乙答{sum(x['role'] == 'user' for x in m)}")
    client, _ = tab(fp16, awq)
    out = client.predict("公司拖欠工资怎么办？", *SETTINGS, api_name="/compare")
    chat_l, chat_r, figs_l, figs_r, agree, speed, memory, status, box = out
    assert _text(chat_l[1]["content"]) == "甲答1" and _text(chat_r[1]["content"]) == "乙答1"
    assert "首字" in figs_l and "tokens/s" in figs_l and "18.0 GB" in figs_l and "9.0 GB" in figs_r
    assert "依次计时" in figs_l and "字符相似度" in agree and status == "对比完成" and box == ""
    assert [row[0] for row in speed["data"]] == ["fp16", "4-bit AWQ"]
    assert [row[1] for row in memory["data"]] == [18.0, 9.0]
    out = client.predict("那经济补偿怎么算？", *SETTINGS, api_name="/compare")
    assert _text(out[0][3]["content"]) == "甲答2"
    assert [m["content"] for m in fp16.calls[-1].messages if m["role"] == "assistant"] == ["甲答1"]
    assert [m["content"] for m in awq.calls[-1].messages if m["role"] == "assistant"] == ["乙答1"]


def test_tab_batch_offers_a_csv(tab: Callable[..., Any]) -> None:
    client, _ = tab(FakeEngine(script=lambda m, p: ANSWER_A), FakeEngine(script=lambda m, p: ANSWER_B))
    table, csv_path, status = client.predict(*SETTINGS, api_name="/compare_batch")
    assert "批量对比完成" in status and table["headers"] == table_columns()
    assert [row[0] for row in table["data"]] == [1, 2, "总计"]
    text = Path(csv_path).read_text(encoding="utf-8-sig")
    assert text.splitlines()[0].startswith("no,question,mode,fp16_ttft_ms") and "总计" in text


def test_tab_shows_the_plan_and_refuses_when_unavailable(tab: Callable[..., Any]) -> None:
    reason = "显存不足：测试用的理由。"
    provider = FakeProvider(FakeEngine(), plan_value=Plan("unavailable", reason))
    client, _ = tab(FakeEngine(), FakeEngine(), provider)
    assert "对比不可用" in client.predict(api_name="/compare_plan")
    with pytest.raises(Exception, match="测试用的理由"):
        client.predict("问题？", *SETTINGS, api_name="/compare")
    assert provider.loads == 0


def test_tab_time_shared_loads_and_frees_per_comparison(tab: Callable[..., Any]) -> None:
    provider = FakeProvider(FakeEngine(name="fp16"), plan_value=Plan("time-shared", "分时"), resident=False)
    client, _ = tab(provider.engine, FakeEngine(), provider)
    for _ in range(2):
        assert client.predict("问题？", *SETTINGS, api_name="/compare")[7] == "对比完成"
    assert (provider.loads, provider.releases) == (2, 2)


def test_tab_stop_aborts_both_engines(tab: Callable[..., Any]) -> None:
    fp16 = FakeEngine(script=lambda m, p: "甲" * 400, delay_s=0.01)
    awq = FakeEngine(script=lambda m, p: "乙" * 400, delay_s=0.01)
    client, provider = tab(fp16, awq, FakeProvider(fp16, resident=False))
    job = client.submit("问题？", "律师", "concurrent", True, 0.7, 0.8, 1024, -1, api_name="/compare")
    deadline = time.monotonic() + 10
    while not (fp16.calls and fp16.calls[0].tokens > 5) and time.monotonic() < deadline:
        time.sleep(0.02)
    job.cancel()
    while (fp16.active_generations() or awq.active_generations()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fp16.active_generations() == awq.active_generations() == 0
    assert fp16.calls[0].finish_reason == awq.calls[0].finish_reason == "abort"
    while provider.releases == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert provider.releases == 1  # the time-shared engine is given back after a Stop too
