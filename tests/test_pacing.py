"""The update pacer: 50 ms between updates of a lone answer, fewer updates each when many stream."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from legal_eagle.ui.pacing import UpdatePacer


def test_interval_grows_with_the_answers_streaming_at_once() -> None:
    pacer = UpdatePacer(min_interval_s=0.05, budget_per_s=60)
    assert pacer.interval() == 0.05 and pacer.active == 0
    with pacer.streaming():
        assert pacer.interval() == 0.05  # alone: every 50 ms
        with pacer.streaming(), pacer.streaming():
            assert pacer.active == 3 and pacer.interval() == 0.05  # 3 x 20/s = the budget
        with pacer.streaming(), pacer.streaming(), pacer.streaming(), pacer.streaming(), pacer.streaming():
            assert pacer.interval() == pytest.approx(0.1)  # 6 answers x 10 updates/s = 60/s
    assert pacer.active == 0


def test_an_answer_that_fails_stops_counting() -> None:
    pacer = UpdatePacer()
    with pytest.raises(RuntimeError), pacer.streaming():
        raise RuntimeError("engine failed")
    assert pacer.active == 0


def test_counting_is_thread_safe() -> None:
    pacer, go = UpdatePacer(), threading.Barrier(32)

    def answer() -> None:
        go.wait()
        for _ in range(200):
            with pacer.streaming():
                pass

    threads = [threading.Thread(target=answer) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pacer.active == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        UpdatePacer(min_interval_s=0)


def test_the_chat_tab_counts_its_streaming_answers(settings: Any) -> None:
    from legal_eagle.engines.fake import FakeEngine
    from legal_eagle.prompts import load_prompts
    from legal_eagle.service import ModelService
    from legal_eagle.ui.chat_tab import ChatHandlers

    handlers = ChatHandlers(ModelService.ready_with(FakeEngine(delay_s=0.01)), settings, load_prompts(), None)
    answer = handlers.respond("问题", [], "律师", 0.7, 0.8, 64, 1.0, True)
    next(answer)  # "正在生成…"
    next(answer)  # the first streamed update: the answer is streaming
    assert handlers.pacer.active == 1
    for _ in answer:
        pass
    assert handlers.pacer.active == 0


def test_missing_matplotlib_fails_fast() -> None:
    from legal_eagle.ui.app import skip_missing_matplotlib

    skip_missing_matplotlib()  # idempotent; True only where matplotlib is not installed
    import importlib.util
    import sys

    if importlib.util.find_spec("matplotlib") is None or sys.modules.get("matplotlib", 0) is None:
        with pytest.raises(ImportError):
            import matplotlib  # noqa: F401  (fails at once, without searching sys.path)


def test_the_chat_tab_asks_the_engine_before_its_first_page_update(settings: Any) -> None:
    """TurboMind starts a request when ``stream`` is called: the prefill then overlaps Gradio's send of
    the first update ("正在生成…"). A Stop while that update is out still closes the stream."""
    from legal_eagle.engines.fake import FakeEngine
    from legal_eagle.prompts import load_prompts
    from legal_eagle.service import ModelService
    from legal_eagle.ui.chat_tab import ChatHandlers

    class Recording(FakeEngine):
        def __init__(self) -> None:
            super().__init__(delay_s=0.01)
            self.streams: list[Any] = []

        def stream(self, messages: Any, params: Any) -> Any:
            gen = super().stream(messages, params)
            self.streams.append(gen)
            return gen

    engine = Recording()
    handlers = ChatHandlers(ModelService.ready_with(engine), settings, load_prompts(), None)
    answer = handlers.respond("问题", [], "律师", 0.7, 0.8, 64, 1.0, True)
    first = next(answer)
    assert "正在生成" in first[-1] and len(engine.streams) == 1
    answer.close()  # the page went away while its first update was out
    assert engine.streams[0].gi_frame is None  # the engine's stream was closed with it
