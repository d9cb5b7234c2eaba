"""GPU memory that a TurboMind process holds without using it, handed back around the engine's load.

Measured on an H100 80GB (docs/benchmarks.md, target 4: a 4-bit 7B serving 8 chats of 4k tokens):

- **CUDA's per-thread stack.** CUDA reserves local memory as stack size x every thread the GPU can
  hold at once, and keeps the largest size any kernel asked for. Setting the limit to 512 bytes
  before TurboMind loads saved 0.3 GiB there (8.33 -> 8.04 GiB peak) at no measured speed cost. It is
  safe: "the driver automatically increases the per-thread stack size for each kernel launch as
  needed" (CUDA driver API, ``cuCtxSetLimit``).
- **The default memory pool.** TurboMind keeps the weights in the device's default stream-ordered
  pool, whose release threshold keeps what the load freed (the weights' repacking temporaries)
  reserved. Trimming it after the load handed back 0.4-0.9 GiB (serving 8.17 -> 7.67 GiB).
- **The same pool during the load.** What the load frees stays reserved until the pool is trimmed, so
  a trim after the load leaves the load's own peak as it was. ``trimming`` trims the pool every
  50 ms while the load runs (``cudaMemPoolTrimTo`` hands back only memory that no allocation uses).
  ``pool_stats`` reads the pool's high-water mark, which shows what the pool held at the peak.

All are best effort: where the CUDA 12 runtime that TurboMind links cannot be found or refuses, the
engine loads as before, and the result says so.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

STACK_LIMIT_BYTES = 512
_LIMIT_STACK_SIZE = 0  # cudaLimitStackSize
# cudaMemPoolAttr: ReservedMemCurrent, ReservedMemHigh, UsedMemCurrent, UsedMemHigh (cuuint64_t each)
_POOL_ATTRS = {"reserved": 5, "reserved_high": 6, "used": 7, "used_high": 8}
CUDART = "libcudart.so.12"  # the runtime TurboMind 0.18 links (loaded once lmdeploy.turbomind is)


def cudart(name: str = CUDART) -> Any | None:
    """The CUDA runtime library, or None where it cannot be opened."""
    try:
        return ctypes.CDLL(name)
    except OSError as exc:
        log.info("GPU memory tweaks off: %s cannot be opened (%s)", name, exc)
        return None


def set_stack_limit(stack_bytes: int = STACK_LIMIT_BYTES, rt: Any | None = None) -> int | None:
    """Set the per-thread CUDA stack of the current device; the limit now in force (None: not set)."""
    rt = rt if rt is not None else cudart()
    if rt is None:
        return None
    if rt.cudaDeviceSetLimit(_LIMIT_STACK_SIZE, ctypes.c_size_t(stack_bytes)) != 0:
        log.info("GPU memory tweaks: cudaDeviceSetLimit(stack %d) refused", stack_bytes)
        return None
    now = ctypes.c_size_t()
    if rt.cudaDeviceGetLimit(ctypes.byref(now), _LIMIT_STACK_SIZE) != 0:
        return None
    return int(now.value)


def _default_pool(rt: Any, device: int | None = None) -> ctypes.c_void_p | None:
    """The default memory pool of ``device`` (None: the current device), or None where CUDA refuses."""
    index = ctypes.c_int(0 if device is None else device)
    if device is None and rt.cudaGetDevice(ctypes.byref(index)) != 0:
        return None
    pool = ctypes.c_void_p()
    return pool if rt.cudaDeviceGetDefaultMemPool(ctypes.byref(pool), index) == 0 else None


def trim_default_pool(rt: Any | None = None) -> bool:
    """Hand the unused part of the current device's default memory pool back to CUDA; True when done."""
    rt = rt if rt is not None else cudart()
    pool = _default_pool(rt) if rt is not None else None
    if pool is None or rt.cudaDeviceSynchronize() != 0:
        return False
    return bool(rt.cudaMemPoolTrimTo(pool, ctypes.c_size_t(0)) == 0)


def pool_stats(device: int = 0, rt: Any | None = None) -> dict[str, int] | None:
    """Bytes the default pool of ``device`` holds now and at most since it was made (``reserved``,
    ``reserved_high``; ``used``, ``used_high``: what allocations use); None where CUDA cannot tell."""
    rt = rt if rt is not None else cudart()
    pool = _default_pool(rt, device) if rt is not None else None
    if pool is None:
        return None
    stats = {}
    for name, attr in _POOL_ATTRS.items():
        value = ctypes.c_uint64()
        if rt.cudaMemPoolGetAttribute(pool, attr, ctypes.byref(value)) != 0:
            return None
        stats[name] = int(value.value)
    return stats


@dataclass
class TrimLoop:
    """What ``trimming`` did: ``trims`` calls per device pool, ``error`` the first refusal (it then stops)."""

    devices: list[int] = field(default_factory=list)
    trims: int = 0
    error: str | None = None

    def describe(self) -> str:
        """For ``info.extra``: off, how many trims, or why it stopped."""
        if not self.devices:
            return "off"
        return f"{self.trims} trims" + (f", stopped: {self.error}" if self.error else "")


@contextmanager
def trimming(devices: Iterable[int] = (0,), interval_s: float = 0.05, rt: Any | None = None) -> Iterator[TrimLoop]:
    """Trim the default pool of each of ``devices`` every ``interval_s`` while the block runs (a thread).

    Memory an allocation still uses is never handed back, so this is safe next to the work that
    allocates; the block's own peak then holds only what is in use. Without the runtime: a no-op.
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be positive")
    rt = rt if rt is not None else cudart()
    pools = [(d, _default_pool(rt, d)) for d in devices] if rt is not None else []
    loop = TrimLoop(devices=[d for d, pool in pools if pool is not None])
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            for device, pool in pools:
                if pool is not None and rt.cudaMemPoolTrimTo(pool, ctypes.c_size_t(0)) != 0:
                    loop.error = f"cudaMemPoolTrimTo refused on GPU {device}"
                    return
            loop.trims += 1

    thread = threading.Thread(target=run, name="gpu-pool-trim", daemon=True) if loop.devices else None
    if thread is not None:
        thread.start()
    try:
        yield loop
    finally:
        stop.set()
        if thread is not None:
            thread.join()
