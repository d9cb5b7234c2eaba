"""Streaming figures (time to first token, decode speed) and GPU memory through NVML.

TurboMind allocates GPU memory outside torch, so ``torch.cuda.memory_allocated`` does not
see it; NVML (``nvidia-ml-py``, module ``pynvml``) reports what the driver gave each
process. Every NVML helper returns None where there is no GPU, no driver or no NVML, and
never raises.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {"tried": False, "module": None}


def _nvml() -> Any | None:
    """The initialised ``pynvml`` module, or None when NVML cannot be used (tried once)."""
    with _nvml_lock:
        if not _nvml_state["tried"]:
            _nvml_state["tried"] = True
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_state["module"] = pynvml
            except Exception as exc:  # no library, no driver, no GPU: all mean "cannot tell"
                log.info("NVML unavailable: %s", exc)
        return _nvml_state["module"]


def _reset_nvml_for_tests() -> None:
    """Forget the cached NVML state (tests only)."""
    with _nvml_lock:
        _nvml_state.update(tried=False, module=None)


def _device_handles(nvml: Any, device_indices: Iterable[int] | None) -> list[Any]:
    """NVML handles of the given device indices (all devices when None)."""
    indices = list(device_indices) if device_indices is not None else list(range(nvml.nvmlDeviceGetCount()))
    return [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]


def gpu_memory_used_by_process(pid: int | None = None,
                               device_indices: Iterable[int] | None = None) -> int | None:
    """GPU memory the driver has given one process, summed over devices.

    Args:
        pid: the process id (default: this process).
        device_indices: NVML device indices to look at (default: all).

    Returns:
        Bytes, or None when NVML is unavailable, the process is not listed (for example in a
        container whose process ids differ from the host's) or the driver hides the figure.
    """
    nvml = _nvml()
    if nvml is None:
        return None
    pid = os.getpid() if pid is None else pid
    try:
        total, found = 0, False
        for handle in _device_handles(nvml, device_indices):
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    total += int(proc.usedGpuMemory)
                    found = True
        return total if found else None
    except Exception as exc:
        log.debug("NVML process query failed: %s", exc)
        return None


def gpu_free_total(index: int = 0) -> tuple[int, int] | None:
    """Free and total memory of one GPU in bytes, or None without NVML."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        mem = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
        return int(mem.free), int(mem.total)
    except Exception as exc:
        log.debug("NVML memory query failed: %s", exc)
        return None


def gpu_model(index: int = 0) -> str | None:
    """A GPU's name and compute capability ("NVIDIA A10 sm86"), or None without NVML."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    except Exception as exc:
        log.debug("NVML device query failed: %s", exc)
        return None
    return f"{name.decode() if isinstance(name, bytes) else name} sm{major}{minor}"


def gpu_used_total(device_indices: Iterable[int] | None = None) -> int | None:
    """Memory in use on the given GPUs by all processes together (bytes), or None without NVML."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        return sum(int(nvml.nvmlDeviceGetMemoryInfo(h).used) for h in _device_handles(nvml, device_indices))
    except Exception as exc:
        log.debug("NVML memory query failed: %s", exc)
        return None


def format_bytes(n: int | None) -> str:
    """Human-readable size in GB with one decimal ('n/a' for None)."""
    return "n/a" if n is None else f"{n / 1e9:.1f} GB"


@dataclass
class StreamTimer:
    """Times one streamed answer.

    Call ``record(n_tokens)`` with the cumulative output token count each time a chunk
    arrives and ``finish()`` at the end. The first chunk that carries tokens marks the first
    token; decode speed counts the tokens after that chunk over the time after it.

    Attributes:
        clock: a monotonic clock in seconds (injectable for tests).
    """

    clock: Callable[[], float] = time.perf_counter
    t0: float = field(init=False)
    t_first: float | None = field(default=None, init=False)
    t_last: float | None = field(default=None, init=False)
    t_end: float | None = field(default=None, init=False)
    first_tokens: int = field(default=0, init=False)
    n_tokens: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.t0 = self.clock()

    def record(self, n_tokens: int) -> None:
        """Note that ``n_tokens`` output tokens exist now (cumulative count)."""
        if n_tokens <= self.n_tokens:
            return
        now = self.clock()
        if self.t_first is None:
            self.t_first, self.first_tokens = now, n_tokens
        self.n_tokens, self.t_last = n_tokens, now

    def finish(self) -> None:
        """Mark the end of the stream (idempotent)."""
        if self.t_end is None:
            self.t_end = self.clock()

    @property
    def ttft_s(self) -> float | None:
        """Seconds from start to the first token, or None if none came."""
        return None if self.t_first is None else self.t_first - self.t0

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens per second after the first token, or None with fewer than two token events."""
        if self.t_first is None or self.t_last is None or self.t_last <= self.t_first:
            return None
        return (self.n_tokens - self.first_tokens) / (self.t_last - self.t_first)

    @property
    def total_s(self) -> float:
        """Seconds from start to ``finish()`` (or to now while running)."""
        end = self.t_end if self.t_end is not None else self.clock()
        return end - self.t0

    def as_dict(self) -> dict[str, float | int | None]:
        """The figures as a plain dict (for logs, exports and the UI)."""
        return {"ttft_s": self.ttft_s, "decode_tok_s": self.decode_tok_s, "total_s": self.total_s,
                "n_tokens": self.n_tokens}
