"""Streaming figures and the NVML helpers' no-GPU behaviour."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from legal_eagle import metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stream_timer_figures() -> None:
    clock = Clock()
    timer = metrics.StreamTimer(clock=clock)
    clock.now = 100.25
    timer.record(0)  # an empty chunk is not a first token
    assert timer.ttft_s is None and timer.decode_tok_s is None
    clock.now = 100.5
    timer.record(1)
    clock.now = 101.5
    timer.record(51)
    timer.record(51)  # no new tokens: ignored
    clock.now = 102.0
    timer.finish()
    assert timer.ttft_s == pytest.approx(0.5)
    assert timer.decode_tok_s == pytest.approx(50.0)  # 50 tokens after the first, in 1.0 s
    assert timer.total_s == pytest.approx(2.0)
    clock.now = 200.0
    timer.finish()  # idempotent
    assert timer.as_dict() == {"ttft_s": pytest.approx(0.5), "decode_tok_s": pytest.approx(50.0),
                               "total_s": pytest.approx(2.0), "n_tokens": 51}


def test_stream_timer_single_chunk_has_no_decode_speed() -> None:
    clock = Clock()
    timer = metrics.StreamTimer(clock=clock)
    clock.now = 100.1
    timer.record(3)
    assert timer.ttft_s == pytest.approx(0.1) and timer.decode_tok_s is None
    clock.now = 101.0
    assert timer.total_s == pytest.approx(1.0)  # still running: measured to now


@pytest.fixture
def fresh_nvml():
    metrics._reset_nvml_for_tests()
    yield
    metrics._reset_nvml_for_tests()


def test_no_nvml_gives_none(fresh_nvml: None, monkeypatch: Any) -> None:
    broken = types.ModuleType("pynvml")

    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert metrics.gpu_memory_used_by_process() is None
    assert metrics.gpu_free_total(0) is None
    assert metrics.gpu_used_total() is None


def _fake_nvml(processes: list[Any]) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: processes[h]  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(free=10 + h, total=100, used=90 - h))
    return nvml


def test_process_memory_summed_over_devices(fresh_nvml: None, monkeypatch: Any) -> None:
    proc = types.SimpleNamespace
    processes = [[proc(pid=7, usedGpuMemory=300), proc(pid=8, usedGpuMemory=5)],
                 [proc(pid=7, usedGpuMemory=200), proc(pid=7, usedGpuMemory=None)]]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(processes))
    assert metrics.gpu_memory_used_by_process(pid=7) == 500
    assert metrics.gpu_memory_used_by_process(pid=7, device_indices=[1]) == 200
    assert metrics.gpu_memory_used_by_process(pid=9) is None  # not listed: cannot tell
    assert metrics.gpu_free_total(1) == (11, 100)
    assert metrics.gpu_used_total() == 90 + 89


def test_nvml_errors_after_init_give_none(fresh_nvml: None, monkeypatch: Any) -> None:
    nvml = _fake_nvml([[], []])

    def fail(*args: Any) -> None:
        raise RuntimeError("GPU is lost")

    nvml.nvmlDeviceGetHandleByIndex = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert metrics.gpu_memory_used_by_process() is None
    assert metrics.gpu_free_total() is None
    assert metrics.gpu_used_total() is None


def test_format_bytes() -> None:
    assert metrics.format_bytes(None) == "n/a"
    assert metrics.format_bytes(9_400_000_000) == "9.4 GB"
