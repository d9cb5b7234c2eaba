"""The model service's stages and errors, the fake engine, and the exports."""

from __future__ import annotations

import json
import threading

import pytest

from legal_eagle.engines.base import Engine, SamplingParams
from legal_eagle.engines.fake import FakeEngine
from legal_eagle.errors import EngineError, OfflineError
from legal_eagle.export import export_meta, to_json, to_markdown
from legal_eagle.service import ModelService


def test_fake_engine_streams_records_and_frees_slot_on_close() -> None:
    engine = FakeEngine(script=lambda m, p: "一二三四五六")
    assert isinstance(engine, Engine)
    stream = engine.stream([{"role": "user", "content": "问"}], SamplingParams(max_new_tokens=4))
    first = next(stream)
    assert first.text == "一" and engine.active_generations() == 1
    stream.close()
    assert engine.active_generations() == 0 and engine.calls[0].finish_reason == "abort"
    chunks = list(engine.stream([{"role": "user", "content": "问"}], SamplingParams(max_new_tokens=4)))
    assert "".join(c.text for c in chunks) == "一二三四" and chunks[-1].finish_reason == "length"


def test_fake_engine_failure_is_an_engine_error() -> None:
    engine = FakeEngine(fail_after=2)
    with pytest.raises(EngineError):
        list(engine.stream([{"role": "user", "content": "问"}], SamplingParams()))
    assert engine.active_generations() == 0


def test_service_reports_stages_then_ready() -> None:
    release = threading.Event()
    seen: list[str] = []

    def prepare(progress):  # type: ignore[no-untyped-def]
        progress("downloading", 0.5, "model.safetensors")
        seen.append(service.status().describe())
        release.wait(5)
        progress("loading", None, "")
        return FakeEngine()

    service = ModelService(prepare, name="t")
    service.start()
    with pytest.raises(EngineError) as info:
        while not seen:
            pass
        _ = service.engine
    assert "模型还在准备中" in info.value.user_message and "正在下载模型权重 · 50%" in info.value.user_message
    release.set()
    assert service.wait(5) and service.status().ready
    assert service.engine.info.backend == "fake"
    assert service.status().as_dict()["ready"] is True


def test_a_load_that_takes_minutes_says_what_usually_causes_it() -> None:
    """TurboMind never finishes creating an engine whose KV cache is too small (H200, 2026-12-03):
    after 5 minutes in the loading stage the page says so and names the setting."""
    from legal_eagle.service import LOADING_SLOW_S, Status

    quick = Status("loading", None, "", elapsed_s=200.0, stage_elapsed_s=LOADING_SLOW_S - 1)
    slow = Status("loading", None, "", elapsed_s=400.0, stage_elapsed_s=LOADING_SLOW_S)
    assert "KV cache" not in quick.describe()
    assert "KV cache 太小" in slow.describe() and "--cache-max-entry-count" in slow.describe()
    assert "KV cache" not in Status("quantizing", None, "", 900.0, 900.0).describe()  # AWQ takes minutes


def test_service_failure_keeps_the_reason() -> None:
    def prepare(progress):  # type: ignore[no-untyped-def]
        raise OfflineError("无法连接 ModelScope，请用 --model-path 指向本地模型目录。")

    service = ModelService(prepare)
    service.run()
    status = service.status()
    assert status.stage == "failed" and "--model-path" in status.detail
    with pytest.raises(EngineError, match="engine failed"):
        _ = service.engine


def test_service_survives_unexpected_exceptions() -> None:
    service = ModelService(lambda progress: 1 / 0)
    service.run()
    assert service.status().stage == "failed" and "ZeroDivisionError" in service.status().detail


def test_exports_carry_disclaimer_model_and_settings() -> None:
    meta = export_meta(FakeEngine().info, "您是律师", "不构成法律意见")
    turns = [{"role": "user", "content": "工资被拖欠怎么办？"},
             {"role": "assistant", "content": "可以申请劳动仲裁。",
              "meta": {"sampling": SamplingParams(temperature=0.3).as_dict(), "tokens": 9, "finish_reason": "stop"}}]
    md = to_markdown(turns, meta)
    assert "不构成法律意见" in md and "工资被拖欠怎么办？" in md and "temperature=0.3" in md and "fake" in md
    data = json.loads(to_json(turns, meta))
    assert data["disclaimer"] == "不构成法律意见" and data["model"]["quantization"] == "fake"
    assert data["messages"][1]["meta"]["sampling"]["temperature"] == 0.3


@pytest.mark.parametrize(("prepare_stage", "label"), [("download", "正在下载模型权重"), ("convert", "正在转换模型格式"),
                                                      ("quantize", "4-bit AWQ 量化"), ("check", "正在校验量化模型"),
                                                      ("wait", "等待中")])
def test_preparer_stage_names_show_as_chinese_labels(prepare_stage: str, label: str) -> None:
    """legal_eagle.prepare reports download/convert/quantize/check/wait; the page must show its words."""
    service = ModelService(lambda progress: FakeEngine(), name="t")
    service.report(prepare_stage, 0.25, "detail")
    described = service.status().describe()
    assert label in described and prepare_stage + " ·" not in described
