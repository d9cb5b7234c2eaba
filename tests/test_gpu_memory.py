"""gpu_memory: the CUDA calls it makes, on a scripted runtime (the real one needs a GPU: tests/gpu)."""

from __future__ import annotations

import ctypes
from typing import Any

from legal_eagle import gpu_memory


class ScriptedRuntime:
    """Answers the few cudart calls gpu_memory makes; ``fail`` names the ones that return an error."""

    def __init__(self, *fail: str) -> None:
        self.fail = set(fail)
        self.calls: list[tuple[str, Any]] = []
        self.stack = 1024

    def _rc(self, name: str) -> int:
        return 1 if name in self.fail else 0

    def cudaDeviceSetLimit(self, limit: int, value: ctypes.c_size_t) -> int:  # noqa: N802 (CUDA's names)
        self.calls.append(("set", (limit, value.value)))
        if "cudaDeviceSetLimit" not in self.fail:
            self.stack = value.value
        return self._rc("cudaDeviceSetLimit")

    def cudaDeviceGetLimit(self, out: Any, limit: int) -> int:  # noqa: N802
        ctypes.cast(out, ctypes.POINTER(ctypes.c_size_t)).contents.value = self.stack
        return self._rc("cudaDeviceGetLimit")

    def cudaGetDevice(self, out: Any) -> int:  # noqa: N802
        ctypes.cast(out, ctypes.POINTER(ctypes.c_int)).contents.value = 0
        return self._rc("cudaGetDevice")

    def cudaDeviceGetDefaultMemPool(self, out: Any, device: ctypes.c_int) -> int:  # noqa: N802
        ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p)).contents.value = 0x1234
        self.calls.append(("pool", device.value))
        return self._rc("cudaDeviceGetDefaultMemPool")

    def cudaDeviceSynchronize(self) -> int:  # noqa: N802
        self.calls.append(("sync", None))
        return self._rc("cudaDeviceSynchronize")

    def cudaMemPoolTrimTo(self, pool: ctypes.c_void_p, keep: ctypes.c_size_t) -> int:  # noqa: N802
        self.calls.append(("trim", (pool.value, keep.value)))
        return self._rc("cudaMemPoolTrimTo")

    def cudaMemPoolGetAttribute(self, pool: ctypes.c_void_p, attr: int, out: Any) -> int:  # noqa: N802
        ctypes.cast(out, ctypes.POINTER(ctypes.c_uint64)).contents.value = 1000 * attr  # attr 5..8
        return self._rc("cudaMemPoolGetAttribute")


def test_stack_limit_is_set_and_read_back() -> None:
    rt = ScriptedRuntime()
    assert gpu_memory.set_stack_limit(rt=rt) == 512
    assert rt.calls == [("set", (0, 512))]
    assert gpu_memory.set_stack_limit(768, rt=ScriptedRuntime()) == 768


def test_a_refused_stack_limit_is_reported_as_not_set() -> None:
    assert gpu_memory.set_stack_limit(rt=ScriptedRuntime("cudaDeviceSetLimit")) is None
    assert gpu_memory.set_stack_limit(rt=ScriptedRuntime("cudaDeviceGetLimit")) is None


def test_trim_syncs_then_trims_the_current_devices_default_pool_to_nothing_kept() -> None:
    rt = ScriptedRuntime()
    assert gpu_memory.trim_default_pool(rt=rt) is True
    assert rt.calls == [("pool", 0), ("sync", None), ("trim", (0x1234, 0))]


def test_trim_reports_failure_at_each_step_without_trimming_after_it() -> None:
    for step in ("cudaGetDevice", "cudaDeviceGetDefaultMemPool", "cudaDeviceSynchronize"):
        rt = ScriptedRuntime(step)
        assert gpu_memory.trim_default_pool(rt=rt) is False
        assert not any(name == "trim" for name, _ in rt.calls)
    assert gpu_memory.trim_default_pool(rt=ScriptedRuntime("cudaMemPoolTrimTo")) is False


def test_no_runtime_means_nothing_done() -> None:
    """On a machine without the CUDA 12 runtime (CI) both are skipped, not errors."""
    assert gpu_memory.cudart("libcudart-that-does-not-exist.so.12") is None
    if gpu_memory.cudart() is None:
        assert gpu_memory.set_stack_limit() is None
        assert gpu_memory.trim_default_pool() is False
        assert gpu_memory.pool_stats() is None


def test_pool_stats_reads_the_pools_current_and_high_water_marks() -> None:
    rt = ScriptedRuntime()
    assert gpu_memory.pool_stats(3, rt=rt) == {"reserved": 5000, "reserved_high": 6000, "used": 7000,
                                                "used_high": 8000}
    assert rt.calls == [("pool", 3)]  # the device asked for, not the current one
    assert gpu_memory.pool_stats(rt=ScriptedRuntime("cudaMemPoolGetAttribute")) is None
    assert gpu_memory.pool_stats(rt=ScriptedRuntime("cudaDeviceGetDefaultMemPool")) is None
