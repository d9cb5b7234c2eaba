"""The consultation tab: multi-turn chat with streaming, Stop, Regenerate, Clear and export.

Handlers live in ``ChatHandlers`` (plain methods, testable without a browser); ``build_chat_tab``
wires them to components. Each browser tab keeps its own history in a ``gr.State``: a list
of turns ``{"role", "content", "meta"?}``, mutated in place while an answer streams so that
a Stop keeps the partial answer.

Stop works twice over: Gradio cancels the running event (``cancels=``), and every running
answer is registered by its Gradio session (``ui.stops``), so that the Stop handler (also the
API's ``/stop``), Gradio's ``/cancel`` and a dropped event stream (seen by ``ui.cancel_watch``)
close its engine stream (right after the chunk being pulled), whether or not Gradio ever closes
the cancelled generator — which on the GPU machine it did not always do for gradio_client's
cancel (docs/reliability.md). A stopped answer that is still iterated ends normally with what it
has ("已停止").
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from legal_eagle.citations import MISSING_NOTICE, Article, StatuteBase, grounding_block, render_panel
from legal_eagle.config import Settings
from legal_eagle.conversation import build_messages, clean_persona, clean_question, trim_to_budget, validate_sampling
from legal_eagle.engines.base import Message, SamplingParams
from legal_eagle.errors import LegalEagleError
from legal_eagle.export import export_meta, to_json, to_markdown
from legal_eagle.metrics import StreamTimer
from legal_eagle.prompts import Prompts
from legal_eagle.service import ModelService
from legal_eagle.ui.pacing import UpdatePacer
from legal_eagle.ui.stops import RunningAnswer, RunningAnswers
from legal_eagle.ui.widgets import CheckedSlider

log = logging.getLogger(__name__)
Turns = list[dict[str, Any]]
Outputs = tuple[list[dict[str, str]], Turns, str, str]
_PAUSE_POLL_S = 0.5
STOPPED = "已停止：已生成的部分保留在对话中。"


def session_of(request: gr.Request | None) -> str | None:
    """The Gradio session (one browser tab, one gradio_client Client) a request belongs to."""
    return getattr(request, "session_hash", None) if request is not None else None


@dataclass
class ChatHandlers:
    """Event handlers of the chat tab, bound to one model service."""

    service: ModelService
    settings: Settings
    prompts: Prompts
    statutes: Future[StatuteBase | None] | None = None  # opened in the background (index build ~20 s once)
    pacer: UpdatePacer = field(default_factory=UpdatePacer)  # updates per 50 ms alone, fewer under load
    answers: RunningAnswers = field(default_factory=RunningAnswers, init=False, repr=False)

    def statute_base(self) -> StatuteBase | None:
        """The statute base once it is open; None while it builds, when absent, or when it failed."""
        if self.statutes is None or not self.statutes.done() or self.statutes.exception() is not None:
            return None
        return self.statutes.result()

    def citations_panel(self, turns: Turns) -> str:
        """The 法条 panel for the last answer: each cited article checked, plus the sources given to the model."""
        base = self.statute_base()
        if base is None:
            if self.statutes is not None and not self.statutes.done():
                return "法条库正在建立索引（首次约 20 秒），请稍候……"
            if self.statutes is not None and self.statutes.exception() is not None:
                return "法条库打开失败，法条核对暂不可用（详见服务日志）。"
            return MISSING_NOTICE
        answer = next((t for t in reversed(turns) if t["role"] == "assistant"), None)
        if answer is None:
            return ""
        sources = [Article(**a) for a in answer.get("meta", {}).get("sources", [])]
        return render_panel(base.check(answer["content"]), sources)

    def stop(self, request: gr.Request | None = None) -> str:
        """Stop this session's running answer (it keeps what it has and ends normally)."""
        if self.answers.stop(session_of(request)):
            log.info("stop asked for a running answer")
        return STOPPED

    def respond(self, question: str, turns: Turns, persona: str, temperature: float, top_p: float,
                max_new_tokens: int, repetition_penalty: float, greedy: bool,
                request: gr.Request | None = None) -> Iterator[Outputs]:
        """Answer a new question, streaming; errors become a Chinese message, input kept."""
        try:
            text = clean_question(question, self.settings.max_input_chars)
            system = clean_persona(persona)
            params = self._params(temperature, top_p, max_new_tokens, repetition_penalty, greedy)
            self._check_ready()
        except LegalEagleError as exc:
            raise gr.Error(exc.user_message) from None
        yield from self._answer(text, turns, system, params, question, session_of(request))

    def regenerate(self, turns: Turns, persona: str, temperature: float, top_p: float,
                   max_new_tokens: int, repetition_penalty: float, greedy: bool,
                   request: gr.Request | None = None) -> Iterator[Outputs]:
        """Drop the last answer and answer its question again."""
        last_user = next((i for i in range(len(turns) - 1, -1, -1) if turns[i]["role"] == "user"), None)
        if last_user is None:
            raise gr.Error("还没有可以重新生成的回答。")
        try:
            system = clean_persona(persona)
            params = self._params(temperature, top_p, max_new_tokens, repetition_penalty, greedy)
            self._check_ready()
        except LegalEagleError as exc:
            raise gr.Error(exc.user_message) from None
        question = turns[last_user]["content"]
        yield from self._wait_while_paused(turns, "")
        del turns[last_user:]
        yield from self._answer(question, turns, system, params, "", session_of(request))

    def _params(self, temperature: float, top_p: float, max_new_tokens: int, repetition_penalty: float,
                greedy: bool) -> SamplingParams:
        return validate_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 repetition_penalty=repetition_penalty, greedy=greedy,
                                 max_new_tokens_cap=self.settings.max_new_tokens_cap)

    def _check_ready(self) -> None:
        """Raise the service's Chinese reason when it cannot answer (a comparison's pause is waited out)."""
        if self.service.paused() is None:
            self.service.engine  # noqa: B018 (raises EngineError while preparing or after a failure)

    def _wait_while_paused(self, turns: Turns, box: str) -> Iterator[Outputs]:
        """While a comparison has the GPU to itself, say so and wait (the question stays in its box)."""
        start = time.monotonic()
        while (reason := self.service.paused()) is not None:
            yield self._outputs(turns, box, f"⏳ {reason}（已等待 {time.monotonic() - start:.0f} 秒）")
            time.sleep(_PAUSE_POLL_S)

    def _answer(self, question: str, turns: Turns, persona: str, params: SamplingParams,
                box: str, session: str | None = None) -> Iterator[Outputs]:
        """Wait out a comparison's pause, then stream one answer with the leased engine."""
        with ExitStack() as stack:
            running = stack.enter_context(self.answers.running(session))
            while True:
                yield from self._wait_while_paused(turns, box)
                try:
                    engine = stack.enter_context(self.service.lease())
                    break
                except LegalEagleError as exc:
                    if self.service.paused() is None:  # not ready or failed (a new pause: wait again)
                        raise gr.Error(exc.user_message) from None
            yield from self._stream(question, turns, persona, params, engine, running)

    def _stream(self, question: str, turns: Turns, persona: str, params: SamplingParams,
                engine: Any, running: RunningAnswer) -> Iterator[Outputs]:
        """Stream one answer into ``turns`` (in place) and the chatbot."""
        history: list[Message] = [{"role": t["role"], "content": t["content"]} for t in turns]
        base = self.statute_base() if self.settings.grounding else None
        sources = base.retrieve(question, k=5) if base is not None else []
        system = f"{persona}\n\n{grounding_block(sources)}" if sources else persona  # articles as data
        try:
            trimmed = trim_to_budget(build_messages(system, history, question), engine.count_tokens,
                                     engine.info.context_len - params.max_new_tokens)
        except LegalEagleError as exc:
            raise gr.Error(exc.user_message) from None
        if self.settings.log_user_text:
            log.info("question: %s", question)
        notice = ""
        if trimmed.dropped_turns:
            notice = (f"对话较长，为适应模型的上下文长度，最早的 {trimmed.dropped_turns} 条消息没有发送给模型"
                      "（界面上仍保留）。")
            gr.Info(notice)
        answer: dict[str, Any] = {"role": "assistant", "content": ""}
        grounded = [asdict(a) for a in sources]
        turns += [{"role": "user", "content": question}, answer]
        timer = StreamTimer()
        tokens, reason, last_yield = 0, "abort", 0.0
        try:
            with self.pacer.streaming(), closing(running):  # closed before the lease goes back
                # Asked for before the first page update: TurboMind's prefill runs while Gradio sends it.
                chunks = running.follow(engine.stream(trimmed.messages, params))  # ends at a Stop
                yield self._outputs(turns, "", f"正在生成… {notice}")
                for chunk in chunks:
                    answer["content"] += chunk.text
                    tokens = chunk.n_tokens
                    timer.record(tokens)
                    if chunk.finish_reason:
                        reason = chunk.finish_reason
                    if time.monotonic() - last_yield >= self.pacer.interval():
                        last_yield = time.monotonic()
                        # Only at a yield: a Stop ends the handler at one, so this is what it keeps.
                        answer["meta"] = self._meta(engine, params, tokens, chunk.finish_reason or "streaming",
                                                    trimmed.dropped_turns, grounded)
                        yield self._outputs(turns, "", f"正在生成… {tokens} tokens {notice}")
        except LegalEagleError as exc:
            reason = "error"
            answer["content"] += f"\n\n⚠️ {exc.user_message}"
            log.warning("generation failed: %s", exc)
        except Exception as exc:  # an engine bug must not end the session
            reason = "error"
            answer["content"] += "\n\n⚠️ 模型生成时出现内部错误，请重试。"
            log.exception("generation failed: %s", type(exc).__name__)
        timer.finish()
        answer["meta"] = self._meta(engine, params, tokens, reason, trimmed.dropped_turns, grounded)
        yield self._outputs(turns, "", self._summary(tokens, reason, timer, notice))

    def _meta(self, engine: Any, params: SamplingParams, tokens: int, reason: str, dropped: int,
              sources: list[dict[str, Any]]) -> dict[str, Any]:
        return {"model": engine.info.name, "quantization": engine.info.quantization,
                "sampling": params.as_dict(), "tokens": tokens, "finish_reason": reason,
                "dropped_messages": dropped, "sources": sources}

    @staticmethod
    def _summary(tokens: int, reason: str, timer: StreamTimer, notice: str) -> str:
        """Status line after an answer: tokens, why it ended, and the same figures as the compare tab
        and the benchmark (first token = the first chunk carrying tokens; speed = tokens after it)."""
        reasons = {"stop": "回答完成", "length": "已达到最大生成长度", "abort": "已停止", "error": "生成出错"}
        line = f"{reasons.get(reason, reason)} · {tokens} tokens"
        if timer.ttft_s is not None:
            line += f" · 首字 {timer.ttft_s * 1000:.0f} ms"
        if timer.decode_tok_s is not None:
            line += f" · {timer.decode_tok_s:.1f} tokens/s"
        return f"{line} {notice}".strip()

    @staticmethod
    def _outputs(turns: Turns, box: str, status: str) -> Outputs:
        return display(turns), turns, box, status

    def clear(self) -> tuple[list[dict[str, str]], Turns, str, str]:
        """Start a new conversation."""
        return [], [], "", ""

    def export(self, turns: Turns, persona: str) -> list[str]:
        """Write the conversation as Markdown and JSON files for download."""
        if not turns:
            raise gr.Error("当前没有可导出的对话。")
        try:
            persona = clean_persona(persona)
        except LegalEagleError as exc:
            raise gr.Error(exc.user_message) from None
        engine = self.service.engine_or_none
        meta = export_meta(engine.info if engine else None, persona, self.prompts.disclaimer)
        folder = Path(tempfile.mkdtemp(prefix="legal-eagle-export-"))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        md, js = folder / f"legal-eagle-{stamp}.md", folder / f"legal-eagle-{stamp}.json"
        md.write_text(to_markdown(turns, meta), encoding="utf-8")
        js.write_text(to_json(turns, meta), encoding="utf-8")
        return [str(md), str(js)]


def display(turns: Turns) -> list[dict[str, str]]:
    """Chatbot messages (role and text only) for our turns."""
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def build_chat_tab(handlers: ChatHandlers) -> list[int]:
    """Lay out the chat tab inside the current ``gr.Blocks`` and wire its events.

    Returns:
        The fn indices of the events that stream answers (for ``cancel_watch.StopHook``).
    """
    settings, prompts = handlers.settings, handlers.prompts
    turns = gr.State([])
    gr.Markdown(prompts.disclaimer, elem_id="disclaimer")
    chatbot = gr.Chatbot(label="对话", elem_id="chatbot", height=480, buttons=["copy"],
                         placeholder="请在下方输入您的法律问题，例如劳动纠纷、合同、婚姻家庭、交通事故等。")
    with gr.Row():
        question = gr.Textbox(label="您的问题", placeholder="请输入问题，按 Enter 发送，Shift+Enter 换行",
                              lines=2, max_lines=8, scale=8, elem_id="question", autofocus=True)
        send = gr.Button("发送", variant="primary", scale=1, elem_id="send")
    with gr.Row():
        stop = gr.Button("停止", variant="stop", elem_id="stop")
        regen = gr.Button("重新生成", elem_id="regenerate")
        clear = gr.Button("清空对话", elem_id="clear")
        export = gr.Button("导出对话", elem_id="export")
    status = gr.Markdown("", elem_id="chat-status")
    with gr.Accordion("法条（核对回答引用的条文）", open=True):
        panel = gr.Markdown(handlers.citations_panel([]), elem_id="citations")
    files = gr.File(label="导出文件（Markdown / JSON）", file_count="multiple", interactive=False,
                    elem_id="export-files", height=110)
    gr.Examples([[e] for e in prompts.examples], inputs=[question], label="示例问题")
    with gr.Accordion("高级设置", open=False):
        persona = gr.Textbox(prompts.persona, label="系统提示（律师角色）", lines=3, elem_id="persona")
        with gr.Row():
            temperature = CheckedSlider(0.0, 2.0, settings.temperature, step=0.05, label="温度 temperature")
            top_p = CheckedSlider(0.01, 1.0, settings.top_p, step=0.01, label="top_p")
        with gr.Row():
            max_new = CheckedSlider(16, settings.max_new_tokens_cap, settings.max_new_tokens, step=16,
                                label="最大生成长度 (tokens)")
            penalty = CheckedSlider(1.0, 2.0, settings.repetition_penalty, step=0.005, label="重复惩罚")
        greedy = gr.Checkbox(False, label="贪心解码（结果可复现，忽略温度与 top_p）")
    sampling = [persona, temperature, top_p, max_new, penalty, greedy]
    outputs = [chatbot, turns, question, status]
    limit = settings.concurrency_limit
    ask = dict(fn=handlers.respond, inputs=[question, turns, *sampling], outputs=outputs,
               concurrency_limit=limit, concurrency_id="chat", api_name="chat")
    send_event = send.click(**ask)  # type: ignore[arg-type]
    submit_event = question.submit(**{**ask, "api_name": False})  # type: ignore[arg-type]
    regen_event = regen.click(handlers.regenerate, inputs=[turns, *sampling], outputs=outputs,
                              concurrency_limit=limit, concurrency_id="chat", api_name="regenerate")
    for event in (send_event, submit_event, regen_event):
        event.then(handlers.citations_panel, inputs=[turns], outputs=[panel], api_name=False, concurrency_limit=None)
    # Said again once the cancel is through: the cancelled stream's last update can land after the first.
    stop.click(handlers.stop, outputs=[status], cancels=[send_event, submit_event, regen_event], api_name="stop",
               concurrency_limit=None).then(
        lambda: STOPPED, outputs=[status], api_name=False, concurrency_limit=None).then(
        handlers.citations_panel, inputs=[turns], outputs=[panel], api_name=False, concurrency_limit=None)
    clear.click(handlers.clear, outputs=outputs, cancels=[send_event, submit_event, regen_event],
                api_name="clear", concurrency_limit=None).then(
        handlers.citations_panel, inputs=[turns], outputs=[panel], api_name=False, concurrency_limit=None)
    export.click(handlers.export, inputs=[turns, persona], outputs=[files], api_name="export",
                 concurrency_limit=None)
    return [dict(event)["id"] for event in (send_event, submit_event, regen_event)]
