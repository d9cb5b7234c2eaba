"""One real headless Chromium session: type a question, watch it stream, press Stop, export."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from legal_eagle.engines.fake import FakeEngine

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (see README)")]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(os.environ.get("LE_TEST_ARTIFACTS", "test-artifacts"))


def _messages(text: str) -> str:
    """The chatbot's text without Gradio's status badge. Under CPU load the cancelled event's
    status sometimes reaches the page as an "Error" badge over the chatbot about 500 ms after Stop
    (the answer text is unchanged; seen twice in the full-suite runs of 2026-12-03 on the 2-core machine). A known
    limit, listed in docs/reliability.md; this test checks that no text arrives after Stop."""
    return text.removeprefix("Error\n")


def test_type_stream_stop_export_in_a_real_browser(launch: Any, tmp_path: Path, labour_statutes: Any) -> None:
    from playwright.sync_api import expect, sync_playwright

    answer = "根据《中华人民共和国劳动合同法》第三十八条，" + "您可以解除劳动合同。" * 300
    engine = FakeEngine(script=lambda m, p: answer, delay_s=0.01)
    client = launch(engine, statutes=labour_statutes)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page.goto(client.src)
        expect(page.locator("#disclaimer")).to_contain_text("不构成法律意见")
        page.locator("#question textarea").fill("公司拖欠工资三个月，我可以解除合同吗？")
        page.locator("#send").click()
        bot = page.locator("#chatbot")
        expect(bot).to_contain_text("第三十八条", timeout=15_000)
        first_len = len(bot.inner_text())
        page.wait_for_timeout(400)
        assert len(bot.inner_text()) > first_len, "the answer did not stream"
        page.locator("#stop").click()
        deadline = time.monotonic() + 5
        while engine.active_generations() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.active_generations() == 0 and engine.calls[0].finish_reason == "abort"
        emitted = answer[: engine.calls[0].tokens]  # all the engine produced before it was stopped
        page.wait_for_timeout(300)  # an update sent before the Stop may still be on its way (seen under load)
        stopped = _messages(bot.inner_text())
        page.wait_for_timeout(500)
        assert _messages(bot.inner_text()) == stopped, "text kept arriving after Stop"
        shown = stopped[stopped.index("根据《"):].strip()
        assert emitted.startswith(shown), "the page shows text the engine produced after Stop"
        assert "您可以解除劳动合同" in stopped  # the partial answer stays on screen
        expect(page.locator("#chat-status")).to_contain_text("已停止", timeout=5_000)
        panel = page.locator("#citations")  # the 法条 panel: the cited article checked, with its text
        expect(panel).to_contain_text("第三十八条", timeout=10_000)
        expect(panel).to_contain_text("未及时足额支付劳动报酬")
        expect(panel).to_contain_text("依据法条")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
        page.locator("#export").click()
        link = page.locator("#export-files a").first
        expect(link).to_be_visible(timeout=10_000)
        with page.expect_download() as download_info:
            page.locator("#export-files a[href$='.md']").first.click()
        saved = tmp_path / "export.md"
        download_info.value.save_as(saved)
        exported = saved.read_text(encoding="utf-8")
        assert "不构成法律意见" in exported and "公司拖欠工资三个月" in exported
        browser.close()


def test_a_full_queue_is_refused_in_chinese_and_the_question_stays(launch: Any, settings: Any) -> None:
    """Gradio's page says "This application is currently busy" in English only; the app's script
    rewrites it. One answer running and one waiting fill a queue of 1: the third, typed in the
    browser, is refused in Chinese, and the question stays in its box."""
    from dataclasses import replace

    from gradio_client import Client
    from playwright.sync_api import expect, sync_playwright

    engine = FakeEngine(script=lambda m, p: "很长的回答。" * 400, delay_s=0.02)
    client = launch(engine, app_settings=replace(settings, concurrency_limit=1, max_queue_size=1))
    other = Client(client.src, verbose=False)
    jobs = [c.submit("占位问题", "律师", 0.7, 0.8, 1024, 1.0, False, api_name="/chat") for c in (client, other)]
    deadline = time.monotonic() + 10
    while engine.active_generations() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active_generations() == 1
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="zh-CN")  # a Chinese browser
        page.goto(client.src)
        expect(page.locator("#disclaimer")).to_contain_text("不构成法律意见")
        question = "排队已满时我的问题会丢吗？"
        page.locator("#question textarea").fill(question)
        page.locator("#send").click()
        expect(page.get_by_text("排队已满", exact=False).first).to_be_visible(timeout=10_000)
        assert "currently busy" not in page.locator("body").inner_text()
        assert page.locator("#question textarea").input_value() == question
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "queue_full.png"))
        browser.close()
    for job in jobs:
        job.cancel()
