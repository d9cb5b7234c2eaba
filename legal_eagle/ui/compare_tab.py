"""The comparison tab: the same question to the fp16 and the 4-bit engine, side by side, measured.

The 4-bit engine is the chat tab's (from its ``ModelService``); the fp16 engine comes from an
``EngineProvider`` that follows the GPU memory plan (``legal_eagle.planner``): resident, or
loaded for each comparison and freed after. Each side keeps its own history, so follow-up
questions go to each engine with its own earlier answers (as FastChat's side-by-side does).
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from legal_eagle.compare import (
    MODE_LABELS,
    MODES,
    BatchRow,
    Contender,
    EngineProvider,
    Mode,
    SideResult,
    Snapshot,
    agreement,
    batch_table,
    finish,
    load_questions,
    run_alone,
    run_batch,
    run_comparison,
    shared_params,
    table_columns,
    write_csv,
)
from legal_eagle.config import Settings
from legal_eagle.conversation import build_messages, clean_question, trim_to_budget, validate_sampling
from legal_eagle.engines.base import Engine, Message, SamplingParams
from legal_eagle.errors import LegalEagleError
from legal_eagle.metrics import format_bytes
from legal_eagle.planner import Plan
from legal_eagle.prompts import Prompts
from legal_eagle.service import ModelService
from legal_eagle.ui.widgets import CheckedSlider

log = logging.getLogger(__name__)
_YIELD_EVERY_S = 0.1
_POLL_S = 0.5
State = dict[str, list[dict[str, str]]]
BUSY = "另一个精度对比正在进行（这张显卡一次只放得下一个模型），请稍后再试。"
REASONS = {"stop": "完成", "length": "达到最大长度", "abort": "已停止", "error": "出错"}


def _new_state() -> State:
    return {"left": [], "right": []}


class _Acquisition:
    """Enters ``provider.acquire()`` in a worker thread so the page can show progress meanwhile."""

    def __init__(self, provider: EngineProvider) -> None:
        self.messages: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._cm = provider.acquire(self.messages.put)
        self.engine: Engine | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._enter, name="compare-acquire", daemon=True)
        self._thread.start()

    def _enter(self) -> None:
        try:
            self.engine = self._cm.__enter__()
        except BaseException as exc:  # handed to the handler's thread
            self.error = exc

    def wait(self, timeout: float) -> bool:
        """True once acquiring has ended (engine or error)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def release(self) -> None:
        """Exit the provider's context (later, in a thread, if the load is still running)."""
        if self._thread.is_alive():
            threading.Thread(target=self._exit_after_load, daemon=True).start()
        else:
            self._exit()

    def _exit_after_load(self) -> None:
        self._thread.join()
        self._exit()

    def _exit(self) -> None:
        if self.engine is not None:
            self.engine = None
            self._cm.__exit__(None, None, None)


@dataclass
class CompareHandlers:
    """Event handlers of the comparison tab.

    Attributes:
        service: the 4-bit chat engine's service (shared with the chat tab).
        provider: hands out the fp16 engine per the memory plan.
        settings: input limits and sampling defaults.
        prompts: the persona.
        questions: the batch questions (default: prompts/compare_questions.txt).
        chat_memory: GPU memory of the 4-bit engine; default: its ``gpu_memory_bytes()`` less
            what the provider's fp16 engine holds (NVML sees processes, and both live in this one).
        labels: display names of the fp16 and the 4-bit side.
    """

    service: ModelService
    provider: EngineProvider
    settings: Settings
    prompts: Prompts
    questions: Sequence[str] = field(default_factory=load_questions)
    chat_memory: Callable[[], int | None] | None = None
    labels: tuple[str, str] = ("fp16", "4-bit AWQ")

    def plan_markdown(self) -> str:
        """The memory plan, as shown at the top of the tab."""
        try:
            return self.provider.plan.describe()
        except Exception as exc:  # the page must still render
            log.exception("planning failed")
            return f"🔴 无法规划显存：{type(exc).__name__}"

    def _awq_memory(self) -> int | None:
        if self.chat_memory is not None:
            return self.chat_memory()
        engine = self.service.engine_or_none
        total = engine.gpu_memory_bytes() if engine is not None else None
        fp16 = self.provider.held_bytes()
        return None if total is None else max(0, total - (fp16 or 0))

    def _prepare(self, mode: object, greedy: object, temperature: object, top_p: object,
                 max_new_tokens: object, seed: object) -> tuple[Mode, SamplingParams, Plan]:
        """Check the settings, the 4-bit engine and the plan; raise ``gr.Error`` in Chinese."""
        if mode not in MODES:
            raise gr.Error(f"计时方式必须是 {' 或 '.join(MODES)}，收到的是 {mode}。")
        try:
            params = validate_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                       repetition_penalty=self.settings.repetition_penalty, greedy=greedy,
                                       seed=seed, max_new_tokens_cap=self.settings.max_new_tokens_cap)
            if self.service.paused() is not None:
                raise gr.Error(BUSY)
            self.service.engine  # noqa: B018 (raises while the chat model is not ready)
        except LegalEagleError as exc:
            raise gr.Error(exc.user_message) from None
        plan = self.provider.plan
        if not plan.available:
            raise gr.Error(plan.reason)
        if plan.mode == "exclusive" and mode == "concurrent":
            gr.Info("这张显卡只放得下一个模型，两个模型无法同时运行：已改为“依次计时”。")
            mode = "sequential"
        return mode, shared_params(params), plan  # type: ignore[return-value]

    def _acquire(self, acquisition: _Acquisition) -> Iterator[str]:
        """Yield progress lines until the fp16 engine is there; raise ``gr.Error`` if it cannot load."""
        start, line = time.monotonic(), "正在准备 fp16 模型…"
        while not acquisition.wait(_POLL_S):
            while not acquisition.messages.empty():
                line = acquisition.messages.get()
            yield f"{line}（已等待 {time.monotonic() - start:.0f} 秒）"
        if acquisition.error is not None:
            err = acquisition.error
            log.warning("fp16 engine unavailable: %s", err)
            message = err.user_message if isinstance(err, LegalEagleError) else f"fp16 模型加载失败：{err}"
            raise gr.Error(message)

    @staticmethod
    def _release(acquisition: _Acquisition) -> Iterator[str]:
        """Hand the fp16 engine back, yielding progress lines (an exclusive plan reloads the chat model here)."""
        worker = threading.Thread(target=acquisition.release, name="compare-release", daemon=True)
        worker.start()
        start, line = time.monotonic(), "正在释放 fp16 模型…"
        while worker.is_alive():
            worker.join(_POLL_S)
            while not acquisition.messages.empty():
                line = acquisition.messages.get()
            yield f"{line}（{time.monotonic() - start:.0f} 秒）"

    @contextmanager
    def _chat_engine(self) -> Iterator[Engine]:
        """The 4-bit chat engine, leased so that no comparison closes it meanwhile; ``gr.Error`` if gone."""
        with ExitStack() as stack:
            try:
                engine = stack.enter_context(self.service.lease())
            except LegalEagleError as exc:
                raise gr.Error(exc.user_message) from None
            yield engine

    def _contender(self, key: str, engine: Engine, persona: str, history: list[Message], question: str,
                   params: SamplingParams, memory: Callable[[], int | None]) -> tuple[Contender, int]:
        """One side's prompt, trimmed to its engine's context; also how many turns were dropped."""
        label = self.labels[0] if key == "left" else self.labels[1]
        try:
            trimmed = trim_to_budget(build_messages(persona, history, question), engine.count_tokens,
                                     engine.info.context_len - params.max_new_tokens)
        except LegalEagleError as exc:
            raise gr.Error(exc.user_message) from None
        return Contender(key, label, engine, trimmed.messages, memory), trimmed.dropped_turns

    def compare(self, question: str, state: State | None, persona: str, mode: str, greedy: bool,
                temperature: float, top_p: float, max_new_tokens: int, seed: float | None) -> Iterator[tuple]:
        """Ask both engines, stream both answers, then show figures, agreement and charts."""
        state = state if isinstance(state, dict) and "left" in state else _new_state()
        try:
            text = clean_question(question, self.settings.max_input_chars)
        except LegalEagleError as exc:
            raise gr.Error(exc.user_message) from None
        run_mode, params, plan = self._prepare(mode, greedy, temperature, top_p, max_new_tokens, seed)
        hist = {k: [{"role": t["role"], "content": t["content"]} for t in state[k]] for k in state}
        if plan.mode == "exclusive":
            yield from self._compare_in_turns(text, state, hist, persona, params, question)
            return
        acquisition = _Acquisition(self.provider)
        try:
            for line in self._acquire(acquisition):
                yield self._outputs(state, None, line, question)
            fp16 = acquisition.engine
            assert fp16 is not None
            with self._chat_engine() as awq:
                left, dropped = self._contender("left", fp16, persona, hist["left"], text, params,  # type: ignore[arg-type]
                                                self.provider.held_bytes)
                right, _ = self._contender("right", awq, persona, hist["right"], text, params,  # type: ignore[arg-type]
                                           self._awq_memory)
                self._open_turn(state, text)
                note = f"（为适应上下文，最早的 {dropped} 条消息未发送）" if dropped else ""
                last, snap = 0.0, None
                with closing(run_comparison(left, right, params, run_mode)) as steps:
                    for snap in steps:
                        state["left"][-1]["content"] = snap.left.text
                        state["right"][-1]["content"] = snap.right.text
                        if snap.done or time.monotonic() - last >= _YIELD_EVERY_S:
                            last = time.monotonic()
                            status = "对比完成" if snap.done else f"正在生成…（{MODE_LABELS[run_mode]}）"
                            yield self._outputs(state, snap, f"{status}{note}", "" if snap.done else question)
        finally:
            acquisition.release()

    def _compare_in_turns(self, text: str, state: State, hist: dict[str, list[dict[str, str]]], persona: str,
                          params: SamplingParams, question: str) -> Iterator[tuple]:
        """The exclusive plan: the 4-bit chat engine answers first, then the fp16 engine alone on the card."""
        snap = Snapshot("sequential", params, SideResult("left", self.labels[0]), SideResult("right", self.labels[1]))
        turn = "轮流独占显存：先 4-bit，再卸载它、加载 fp16"
        with self._chat_engine() as awq:
            right, dropped = self._contender("right", awq, persona, hist["right"], text, params,  # type: ignore[arg-type]
                                             self._awq_memory)
            self._open_turn(state, text)
            note = f"（为适应上下文，最早的 {dropped} 条消息未发送）" if dropped else ""
            yield from self._side_alone(right, snap, state, params, f"4-bit 模型正在生成…（{turn}）{note}", question)
        acquisition = _Acquisition(self.provider)
        try:
            for line in self._acquire(acquisition):
                yield self._outputs(state, snap, line, question)
            fp16 = acquisition.engine
            assert fp16 is not None
            left, _ = self._contender("left", fp16, persona, hist["left"], text, params,  # type: ignore[arg-type]
                                      self.provider.held_bytes)
            yield from self._side_alone(left, snap, state, params, f"fp16 模型正在生成…（{turn}）{note}", question)
            for line in self._release(acquisition):
                yield self._outputs(state, snap, line, question)
        finally:
            acquisition.release()
        yield self._outputs(state, finish(snap), f"对比完成（{MODE_LABELS['sequential']}，{turn}）{note}", "")

    def _side_alone(self, contender: Contender, snap: Snapshot, state: State, params: SamplingParams,
                    status: str, box: str) -> Iterator[tuple]:
        """Stream one side alone into ``snap`` and its conversation, a page update every 100 ms."""
        result = contender.result()
        setattr(snap, contender.key, result)
        last = 0.0
        with closing(run_alone(contender, params, result)) as steps:
            for side in steps:
                state[contender.key][-1]["content"] = side.text
                if time.monotonic() - last >= _YIELD_EVERY_S:
                    last = time.monotonic()
                    yield self._outputs(state, snap, status, box)

    @staticmethod
    def _open_turn(state: State, text: str) -> None:
        for side in ("left", "right"):
            state[side] += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]

    def _outputs(self, state: State, snap: Snapshot | None, status: str, box: str) -> tuple:
        """Values for the tab's output components."""
        chats = [[{"role": t["role"], "content": t["content"]} for t in state[k]] for k in ("left", "right")]
        if snap is None:
            return (*chats, state, "", "", "", _speed_frame([]), _memory_frame([]), status, box)
        sides = [snap.left, snap.right]
        agree = agreement_markdown(snap) if snap.done else ""
        shown = sides if snap.done else []
        figures = figures_markdown(snap.left, snap.mode), figures_markdown(snap.right, snap.mode)
        return (*chats, state, *figures, agree, _speed_frame(shown), _memory_frame(shown), status, box)

    def clear(self) -> tuple:
        """Start over: empty both conversations."""
        return self._outputs(_new_state(), None, "", "")

    def batch(self, persona: str, mode: str, greedy: bool, temperature: float, top_p: float,
              max_new_tokens: int, seed: float | None) -> Iterator[tuple[pd.DataFrame, str | None, str]]:
        """Compare every shipped question; stream the table, then offer it as CSV."""
        run_mode, params, plan = self._prepare(mode, greedy, temperature, top_p, max_new_tokens, seed)
        columns = table_columns()
        total = len(self.questions)
        rows: list[BatchRow] = []
        label = MODE_LABELS[run_mode]
        if plan.mode == "exclusive":
            label += "，轮流独占显存：先全部 4-bit，再全部 fp16"
            progress = self._batch_in_turns(persona, params, rows)
        else:
            progress = self._batch_together(persona, params, run_mode, rows)
        for line in progress:
            yield pd.DataFrame(batch_table(rows), columns=columns), None, f"{line}（{label}）"
        folder = Path(tempfile.mkdtemp(prefix="legal-eagle-compare-"))
        path = write_csv(rows, folder / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.csv")
        yield (pd.DataFrame(batch_table(rows), columns=columns), str(path),
               f"批量对比完成：{total} 个问题（{label}，{_sampling_label(params)}）")

    def _batch_together(self, persona: str, params: SamplingParams, run_mode: Mode,
                        rows: list[BatchRow]) -> Iterator[str]:
        """Both engines loaded together: question by question (``run_batch``); appends to ``rows``."""
        acquisition = _Acquisition(self.provider)
        try:
            yield from self._acquire(acquisition)
            fp16 = acquisition.engine
            assert fp16 is not None
            with self._chat_engine() as awq:
                def contenders(question: str) -> tuple[Contender, Contender]:
                    left, _ = self._contender("left", fp16, persona, [], question, params, self.provider.held_bytes)
                    right, _ = self._contender("right", awq, persona, [], question, params, self._awq_memory)
                    return left, right

                yield f"批量对比进行中：0/{len(self.questions)}"
                for row in run_batch(self.questions, contenders, params, run_mode):
                    rows.append(row)
                    yield f"批量对比进行中：{len(rows)}/{len(self.questions)}"
        finally:
            acquisition.release()

    def _batch_in_turns(self, persona: str, params: SamplingParams, rows: list[BatchRow]) -> Iterator[str]:
        """The exclusive plan: every question on the 4-bit chat engine, then every one on the fp16 engine
        alone (one swap for the whole batch); appends to ``rows`` as the fp16 answers complete."""
        total, right = len(self.questions), []
        with self._chat_engine() as awq:
            for index, question in enumerate(self.questions, start=1):
                yield f"第一轮（4-bit）：{index - 1}/{total}"
                contender, _ = self._contender("right", awq, persona, [], question, params, self._awq_memory)
                with closing(run_alone(contender, params)) as steps:
                    right.append(_last(steps))
        acquisition = _Acquisition(self.provider)
        try:
            yield from self._acquire(acquisition)
            fp16 = acquisition.engine
            assert fp16 is not None
            for index, question in enumerate(self.questions, start=1):
                yield f"第二轮（fp16）：{index - 1}/{total}"
                contender, _ = self._contender("left", fp16, persona, [], question, params, self.provider.held_bytes)
                with closing(run_alone(contender, params)) as steps:
                    left = _last(steps)
                rows.append(BatchRow(index, question, "sequential", left, right[index - 1],
                                     agreement(left.text, right[index - 1].text)))
            yield f"第二轮（fp16）：{total}/{total}"
            yield from self._release(acquisition)
        finally:
            acquisition.release()


def _last(steps: Iterator[SideResult]) -> SideResult:
    """The final result of ``run_alone``."""
    result = None
    for result in steps:  # noqa: B007
        pass
    assert result is not None
    return result


def _sampling_label(params: SamplingParams) -> str:
    """'贪心解码' or the sampling settings with the shared seed."""
    if params.greedy:
        return "贪心解码"
    return f"采样 temperature={params.temperature} top_p={params.top_p} seed={params.seed}"


def figures_markdown(side: SideResult, mode: Mode) -> str:
    """The figures under one answer."""
    parts = [f"**{side.label}**（{side.quantization}）"]
    parts.append(f"首字 {side.ttft_s * 1000:.0f} ms" if side.ttft_s is not None else "首字 —")
    parts.append(f"解码 {side.decode_tok_s:.1f} tokens/s" if side.decode_tok_s is not None else "解码 —")
    parts.append(f"输出 {side.output_tokens} tokens")
    if side.total_s is not None:
        parts.append(f"用时 {side.total_s:.1f} s")
    parts.append(f"显存 {format_bytes(side.gpu_memory_bytes)}")
    if side.finish_reason:
        parts.append(REASONS.get(side.finish_reason, side.finish_reason))
    lines = [" · ".join(parts), f"计时方式：{MODE_LABELS[mode]}"]
    if side.others_running:
        lines.append(f"⚠️ 开始时该引擎另有 {side.others_running} 个请求在运行（如聊天用户），速度可能偏低。")
    if side.error:
        lines.append(f"⚠️ {side.error}")
    return "  \n".join(lines)


def agreement_markdown(snap: Snapshot) -> str:
    """How far the two answers agree, in words."""
    agree = snap.agreement or agreement(snap.left.text, snap.right.text)
    sim = (f"**一致性**：字符相似度 {agree.char_similarity:.1%}（difflib）"
           f"· 前 {agree.common_prefix_chars} 字完全相同")
    left, right = agree.citations_left, agree.citations_right
    if not left and not right:
        cites = "两个回答都没有引用具体法条"
    elif agree.same_citations:
        cites = "引用的法条相同：" + "、".join(f"《{law}》{art}" for law, art in sorted(left))
    else:
        only_l = "、".join(f"《{law}》{art}" for law, art in sorted(left - right)) or "无"
        only_r = "、".join(f"《{law}》{art}" for law, art in sorted(right - left)) or "无"
        cites = (f"引用的法条不同（重合度 {agree.citation_jaccard or 0:.0%}）："
                 f"仅 {snap.left.label}：{only_l}；仅 {snap.right.label}：{only_r}")
    sampling = "贪心解码" if snap.params.greedy else f"采样，共同随机种子 {snap.params.seed}"
    return f"{sim}  \n{cites}  \n（{sampling}，{MODE_LABELS[snap.mode]}）"


def _speed_frame(sides: Sequence[SideResult]) -> pd.DataFrame:
    rows = [(s.label, round(s.decode_tok_s, 1)) for s in sides if s.decode_tok_s is not None]
    return pd.DataFrame(rows, columns=["engine", "tok_s"])


def _memory_frame(sides: Sequence[SideResult]) -> pd.DataFrame:
    rows = [(s.label, round(s.gpu_memory_bytes / 1e9, 2)) for s in sides if s.gpu_memory_bytes is not None]
    return pd.DataFrame(rows, columns=["engine", "memory_gb"])


def build_compare_tab(handlers: CompareHandlers) -> None:
    """Lay out the comparison tab inside the current ``gr.Blocks`` and wire its events."""
    settings = handlers.settings
    left_label, right_label = handlers.labels
    gr.Markdown(f"同一个问题同时交给 **{left_label}** 与 **{right_label}** 两个模型，比较回答、速度与显存。"
                "默认“依次计时”：两个模型各自独占 GPU 时计时；“同时运行”时两者共享显存带宽，速度都会偏低。")
    plan = gr.Markdown(handlers.plan_markdown, elem_id="compare-plan")
    refresh = gr.Button("重新检测显存", size="sm", elem_id="compare-refresh")
    state = gr.State(_new_state())
    with gr.Row():
        with gr.Column():
            chat_l = gr.Chatbot(label=left_label, elem_id="compare-left", height=420, buttons=["copy"])
            figs_l = gr.Markdown("", elem_id="compare-left-figures")
        with gr.Column():
            chat_r = gr.Chatbot(label=right_label, elem_id="compare-right", height=420, buttons=["copy"])
            figs_r = gr.Markdown("", elem_id="compare-right-figures")
    agree = gr.Markdown("", elem_id="compare-agreement")
    with gr.Row():
        speed = gr.BarPlot(_speed_frame([]), x="engine", y="tok_s", color="engine", title="解码速度",
                           x_title="模型", y_title="tokens/s", height=220, elem_id="compare-speed")
        memory = gr.BarPlot(_memory_frame([]), x="engine", y="memory_gb", color="engine", title="显存占用",
                            x_title="模型", y_title="GB", height=220, elem_id="compare-memory")
    with gr.Row():
        question = gr.Textbox(label="对比问题", placeholder="输入法律问题，两个模型分别回答；可继续追问",
                              lines=2, max_lines=6, scale=8, elem_id="compare-question")
        ask = gr.Button("开始对比", variant="primary", scale=1, elem_id="compare-send")
    with gr.Row():
        stop = gr.Button("停止", variant="stop", elem_id="compare-stop")
        clear = gr.Button("清空", elem_id="compare-clear")
    status = gr.Markdown("", elem_id="compare-status")
    with gr.Accordion("对比设置", open=False):
        mode = gr.Radio([(MODE_LABELS[m], m) for m in MODES], value="sequential", label="计时方式")
        greedy = gr.Checkbox(True, label="贪心解码（两边逐字可比，忽略温度与 top_p）")
        with gr.Row():
            temperature = CheckedSlider(0.0, 2.0, settings.temperature, step=0.05, label="温度 temperature")
            top_p = CheckedSlider(0.01, 1.0, settings.top_p, step=0.01, label="top_p")
        with gr.Row():
            max_new = CheckedSlider(16, settings.max_new_tokens_cap, min(512, settings.max_new_tokens_cap),
                                    step=16, label="最大生成长度 (tokens)")
            seed = gr.Number(-1, precision=0, label="随机种子（-1 为随机，两边共用同一个）")
        persona = gr.Textbox(handlers.prompts.persona, label="系统提示（律师角色）", lines=3)
    with gr.Accordion(f"批量对比（{len(handlers.questions)} 个固定问题，可下载 CSV）", open=False):
        run_all = gr.Button("运行批量对比", elem_id="compare-batch")
        batch_status = gr.Markdown("", elem_id="compare-batch-status")
        table = gr.Dataframe(pd.DataFrame(columns=table_columns()), label="逐题结果与总计", interactive=False,
                             wrap=True, elem_id="compare-table")
        csv_file = gr.File(label="下载 CSV", interactive=False, elem_id="compare-csv")
    sampling = [persona, mode, greedy, temperature, top_p, max_new, seed]
    outputs = [chat_l, chat_r, state, figs_l, figs_r, agree, speed, memory, status, question]
    common: dict[str, Any] = dict(concurrency_limit=1, concurrency_id="compare")
    send_event = ask.click(handlers.compare, inputs=[question, state, *sampling], outputs=outputs,
                           api_name="compare", **common)
    submit_event = question.submit(handlers.compare, inputs=[question, state, *sampling], outputs=outputs,
                                   api_visibility="private", **common)
    batch_event = run_all.click(handlers.batch, inputs=sampling, outputs=[table, csv_file, batch_status],
                                api_name="compare_batch", **common)
    stop.click(lambda: "已停止。", outputs=[status], cancels=[send_event, submit_event, batch_event],
               api_visibility="private", concurrency_limit=None)
    clear.click(handlers.clear, outputs=outputs, cancels=[send_event, submit_event], api_name="compare_clear",
                concurrency_limit=None)
    refresh.click(handlers.plan_markdown, outputs=[plan], api_name="compare_plan", concurrency_limit=None)
