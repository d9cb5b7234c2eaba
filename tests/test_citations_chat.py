"""The 法条 panel and grounding in the chat tab: retrieved articles reach the model as data, cited ones are checked."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from legal_eagle.citations import MISSING_NOTICE
from legal_eagle.citations.panel import GROUNDING_END, GROUNDING_START
from legal_eagle.config import Settings
from legal_eagle.engines.fake import FakeEngine
from legal_eagle.prompts import load_prompts
from legal_eagle.service import ModelService
from legal_eagle.ui.chat_tab import ChatHandlers

ANSWER = "根据《中华人民共和国劳动合同法》第三十八条第一款第二项，您可以解除合同；另见该法第一百条。"
QUESTION = "公司拖欠工资三个月，我可以解除劳动合同吗？"


def handlers(settings: Settings, statutes: Any) -> tuple[ChatHandlers, FakeEngine]:
    engine = FakeEngine(script=lambda m, p: ANSWER)
    return ChatHandlers(ModelService.ready_with(engine), settings, load_prompts(), statutes), engine


def ask(h: ChatHandlers) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    for _ in h.respond(QUESTION, turns, "律师", 0.7, 0.8, 64, 1.0, True):
        pass
    return turns


def test_grounding_gives_retrieved_articles_to_the_model_as_data(settings: Settings, labour_statutes: Any) -> None:
    h, engine = handlers(settings, labour_statutes)
    turns = ask(h)
    system = engine.calls[0].messages[0]
    assert system["role"] == "system" and system["content"].startswith("律师")
    block = system["content"].split(GROUNDING_START, 1)[1].split(GROUNDING_END, 1)[0]
    sources = turns[-1]["meta"]["sources"]
    assert 1 <= len(sources) <= 5 and "拖欠" in block  # relevant articles, recorded with the answer
    for source in sources:
        assert f"[{sources.index(source) + 1}] 《{source['law_title']}》" in block
        assert source["law_title"] in ("中华人民共和国劳动合同法", "中华人民共和国劳动法")
    assert engine.calls[0].messages[-1] == {"role": "user", "content": QUESTION}  # the question stays apart


def test_panel_checks_each_citation_and_lists_sources(settings: Settings, labour_statutes: Any) -> None:
    h, _ = handlers(settings, labour_statutes)
    panel = h.citations_panel(ask(h))
    assert "#### 法条" in panel and "共引用 2 处，其中 1 处无法核实" in panel
    assert "（二）未及时足额支付劳动报酬的" in panel  # the cited 项 is quoted
    assert "第一百条" in panel and "未找到" in panel  # past the law's end (98 articles)
    assert "#### 依据法条" in panel and "2012-12-28" in panel


def test_no_grounding_setting_and_no_base(settings: Settings, labour_statutes: Any) -> None:
    h, engine = handlers(replace(settings, grounding=False), labour_statutes)
    turns = ask(h)
    assert engine.calls[0].messages[0]["content"] == "律师" and turns[-1]["meta"]["sources"] == []
    assert "共引用 2 处" in h.citations_panel(turns)  # checking still works without grounding
    h, engine = handlers(settings, None)
    assert h.citations_panel(ask(h)) == MISSING_NOTICE and engine.calls[0].messages[0]["content"] == "律师"
    building: Future[Any] = Future()
    h, _ = handlers(settings, building)
    assert "正在建立索引" in h.citations_panel([])


def test_a_failed_index_build_is_said_and_chat_still_works(settings: Settings) -> None:
    failed: Future[Any] = Future()
    failed.set_exception(OSError("read-only"))
    h, engine = handlers(settings, failed)
    turns = ask(h)
    assert turns[-1]["content"] == ANSWER and "失败" in h.citations_panel(turns)


def test_app_logs_why_the_statute_base_failed(caplog: Any) -> None:
    import app  # the panel says "详见服务日志": the reason must be there

    failed: Future[Any] = Future()
    failed.add_done_callback(app._log_statute_failure)
    failed.set_exception(OSError("read-only file system"))
    absent: Future[Any] = Future()
    absent.add_done_callback(app._log_statute_failure)
    absent.set_result(None)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "read-only file system" in caplog.text
