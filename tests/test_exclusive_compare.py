"""A GPU too small for both models (24 GB): the comparison closes the chat engine for its fp16 half.

A pretend GPU keeps the books: engines take memory when they load and give it back when they
close, so the tests can check what a real card would see (never both engines at once, the fp16
engine loaded only after the chat engine closed, the chat engine back afterwards).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from legal_eagle.config import Settings
from legal_eagle.engines.fake import FakeEngine
from legal_eagle.errors import EngineError, GpuMemoryError
from legal_eagle.planner import PAUSE_REASON, PlannedProvider
from legal_eagle.prompts import load_prompts
from legal_eagle.service import ModelService

GB = 10**9
A10 = (23_700 * 10**6, 24_146 * 10**6)  # free right after boot, total (NVML)
AWQ_W, FP16_W = int(5.2 * GB), int(15.5 * GB)
CHAT_HELD, FP16_HELD = int(9.4 * GB), int(18.1 * GB)  # measured on the H100 with small KV caches
PERSONA = "您是一个专业的律师。"


class Gpu:
    """Free memory and who holds what; a load that does not fit fails as TurboMind's would abort."""

    def __init__(self, free: int, total: int) -> None:
        self.free, self.total, self.process = free, total, 0
        self.log: list[str] = []

    def take(self, n: int, what: str) -> None:
        if n > self.free:
            raise AssertionError(f"{what}: {n / GB:.1f} GB asked, {self.free / GB:.1f} GB free: TurboMind aborts")
        self.free -= n
        self.process += n
        self.log.append(f"{what} {'+' if n > 0 else ''}{n / GB:.1f}")


@dataclass
class GpuEngine(FakeEngine):
    """A fake engine that holds memory on a ``Gpu`` until closed (``frees=False``: leaks it)."""

    gpu: Gpu | None = None
    size: int = 0
    frees: bool = True
    closed: bool = field(default=False)

    def __post_init__(self) -> None:
        assert self.gpu is not None
        self.gpu.take(self.size, f"load {self.name}")

    def gpu_memory_bytes(self) -> int | None:
        return None if self.closed else self.size

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True
        if self.frees:
            assert self.gpu is not None
            self.gpu.take(-self.size, f"close {self.name}")


class Card:
    """A 24 GB card with the 4-bit chat engine loaded, its service, and a planned provider."""

    def __init__(self, free: int = A10[0], total: int = A10[1], chat_frees: bool = True,
                 delay_s: float = 0.0, drain_timeout_s: float = 5.0) -> None:
        self.gpu = Gpu(free, total)
        self.delay_s = delay_s
        self.chats: list[GpuEngine] = [self._chat(chat_frees)]
        self.fp16s: list[GpuEngine] = []
        self.service = ModelService.ready_with(self.chats[0], name="chat")
        self.reload_fails = False

        def reload() -> GpuEngine:
            if self.reload_fails:
                raise EngineError("显存不足，无法加载模型。", "reload failed (scripted)")
            self.chats.append(self._chat(True))
            return self.chats[-1]

        def load_fp16(share: float) -> GpuEngine:
            assert 0.01 <= share <= 0.95
            assert all(c.closed for c in self.chats), "fp16 loaded while the chat engine holds memory"
            self.fp16s.append(GpuEngine(name="fp16", script=lambda m, p: "甲" * 20, delay_s=delay_s,
                                        gpu=self.gpu, size=FP16_HELD))
            return self.fp16s[-1]

        self.provider = PlannedProvider(
            load_fp16, sizes=lambda: (AWQ_W, FP16_W),
            chat_engine_loaded=lambda: self.service.engine_or_none is not None,
            gpu_free_total=lambda: (self.gpu.free, self.gpu.total), process_memory=lambda: self.gpu.process,
            turbomind_available=lambda: True,
            suspend_chat=lambda say: self.service.suspended(reload, PAUSE_REASON, drain_timeout_s, say))

    def _chat(self, frees: bool) -> GpuEngine:
        return GpuEngine(name="4-bit", script=lambda m, p: "乙" * 20, delay_s=self.delay_s, gpu=self.gpu,
                         size=CHAT_HELD, frees=frees)


def test_a10_plan_is_exclusive_and_the_comparison_swaps_the_engines() -> None:
    card = Card()
    assert card.provider.plan.mode == "exclusive" and "聊天暂停" in card.provider.plan.reason
    said: list[str] = []
    with card.provider.acquire(said.append) as fp16:
        assert card.chats[0].closed and card.service.engine_or_none is None
        assert card.service.paused() == PAUSE_REASON
        with pytest.raises(EngineError) as info:
            card.service.engine  # noqa: B018
        assert info.value.user_message == PAUSE_REASON
        assert card.gpu.free == A10[0] - FP16_HELD and card.provider.held_bytes() == FP16_HELD
        assert card.provider.plan.mode == "exclusive"  # the plan in force while loaded
        assert list(fp16.stream([{"role": "user", "content": "问"}], _greedy()))[-1].finish_reason == "stop"
    assert fp16.closed and len(card.chats) == 2 and not card.chats[1].closed
    assert card.service.engine is card.chats[1] and card.service.paused() is None
    assert card.gpu.free == A10[0] - CHAT_HELD
    assert card.gpu.log == ["load 4-bit +9.4", "close 4-bit -9.4", "load fp16 +18.1", "close fp16 -18.1",
                            "load 4-bit +9.4"]
    assert [m for m in said if "卸载 4-bit" in m] and [m for m in said if "重新加载 4-bit" in m]


def test_running_answers_finish_before_the_swap_and_new_ones_wait() -> None:
    card = Card()
    lease = card.service.lease()
    engine = lease.__enter__()  # an answer streaming on the chat engine
    entered = threading.Event()

    def compare() -> None:
        with card.provider.acquire():
            entered.set()

    thread = threading.Thread(target=compare)
    thread.start()
    time.sleep(0.3)
    assert not entered.is_set() and not engine.closed  # the running answer keeps its engine
    assert card.service.paused() == PAUSE_REASON  # ...and new answers already wait
    with pytest.raises(EngineError), card.service.lease():
        pass
    lease.__exit__(None, None, None)
    thread.join(5)
    assert entered.is_set() and engine.closed and card.service.engine is card.chats[1]


def test_a_swap_gives_up_when_answers_do_not_finish_and_closes_nothing() -> None:
    card = Card(drain_timeout_s=0.3)
    with card.service.lease(), pytest.raises(GpuMemoryError) as info, card.provider.acquire():
        pass
    assert "仍在生成" in info.value.user_message
    assert not card.chats[0].closed and card.service.paused() is None and card.fp16s == []


def test_memory_not_given_back_refuses_the_fp16_load_and_restores_the_chat() -> None:
    card = Card(free=A10[0], chat_frees=False)  # the closed engine keeps its 9.4 GB (a leak)
    with pytest.raises(GpuMemoryError) as info, card.provider.acquire():
        pass
    assert "显存不足" in info.value.user_message and card.fp16s == []  # refused from fresh numbers, no abort
    assert card.service.engine is card.chats[1] and card.service.paused() is None


def test_the_chat_comes_back_when_the_comparison_fails_and_a_failed_reload_says_so() -> None:
    card = Card()
    with pytest.raises(RuntimeError), card.provider.acquire():
        raise RuntimeError("comparison broke")
    assert card.service.engine is card.chats[1] and card.fp16s[0].closed
    card.reload_fails = True
    with card.provider.acquire():
        pass
    status = card.service.status()
    assert status.stage == "failed" and "重新加载模型失败" in status.detail and "重启" in status.detail
    assert card.service.paused() is None


def test_host_can_turn_the_pause_off() -> None:
    card = Card()
    off = PlannedProvider(lambda share: FakeEngine(), sizes=lambda: (AWQ_W, FP16_W), chat_engine_loaded=lambda: True,
                          gpu_free_total=lambda: (card.gpu.free, card.gpu.total),
                          process_memory=lambda: card.gpu.process, turbomind_available=lambda: True)
    assert off.plan.mode == "unavailable" and "LE_COMPARE_PAUSE_CHAT" in off.plan.reason


def _greedy() -> Any:
    from legal_eagle.engines.base import SamplingParams

    return SamplingParams(max_new_tokens=64, greedy=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def app() -> Iterator[tuple[Card, Any]]:
    """The chat and comparison tabs on the pretend 24 GB card, served for gradio_client."""
    from gradio_client import Client

    from legal_eagle.ui.app import build_app

    card = Card(delay_s=0.01)
    demo = build_app(card.service, Settings(max_input_chars=200, grounding=False), load_prompts(),
                     comparison=card.provider)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True,
                            quiet=True, show_error=True)
    try:
        yield card, Client(url, verbose=False)
    finally:
        demo.close()


COMPARE = ("您是一个专业的律师。", "concurrent", True, 0.7, 0.8, 64, -1)


def test_tab_compares_in_turns_and_a_chat_question_waits_then_is_answered(app: tuple[Card, Any]) -> None:
    card, client = app
    assert "轮流独占显存" in client.predict(api_name="/compare_plan")
    job = client.submit("公司拖欠工资怎么办？", *COMPARE, api_name="/compare")  # concurrent asked: turns given
    deadline = time.monotonic() + 20
    while card.service.paused() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert card.service.paused() == PAUSE_REASON
    chat = client.submit("房东不退押金怎么办？", PERSONA, 0.7, 0.8, 64, 1.0, True, api_name="/chat")
    out = job.result(timeout=30)
    chat_l, chat_r, figs_l, figs_r, agree, speed, memory, status, _ = out
    assert "甲" * 20 in str(chat_l) and "乙" * 20 in str(chat_r)
    assert "依次计时" in figs_l and "轮流独占" in status and "字符相似度" in agree
    assert [row[1] for row in memory["data"]] == [18.1, 9.4]  # each engine's own memory, read while loaded
    answer = chat.result(timeout=30)
    assert "乙" * 20 in str(answer[0])  # the chat question waited, then the reloaded 4-bit engine answered
    waited = [u for u in chat.outputs() if "⏳" in str(u[-1])]
    assert waited and PAUSE_REASON in str(waited[0][-1])  # ...and was told why while waiting
    assert "房东不退押金怎么办" not in str(waited[0][0])  # the question stayed in its box meanwhile
    assert len(card.chats) == 2 and card.chats[0].closed and card.fp16s[0].closed


def test_tab_batch_swaps_once_for_all_questions(app: tuple[Card, Any]) -> None:
    card, client = app
    table, csv_path, status = client.predict(*COMPARE, api_name="/compare_batch")
    assert "批量对比完成" in status and "先全部 4-bit，再全部 fp16" in status
    assert len(card.fp16s) == 1 and len(card.chats) == 2  # one swap, not one per question
    rows = [r for r in table["data"] if r[0] != "总计"]
    assert len(rows) >= 10 and all(r[2] == "sequential" for r in rows)
    assert csv_path.endswith(".csv")


def test_a_lease_taken_as_the_engine_comes_back_is_counted() -> None:
    """The engine may come back between the lease's check and its reason lookup: count it, never go below 0."""

    class Racing(ModelService):
        @property
        def engine(self) -> Any:  # the reload lands right as the lease asks why it cannot have the engine
            with self._lock:
                self._engine, self._paused = back, None
            return back

    back = FakeEngine(name="reloaded")
    service = Racing(lambda progress: FakeEngine(), name="chat")
    with service.lease() as engine:
        assert engine is back and service._leases == 1
    assert service._leases == 0
