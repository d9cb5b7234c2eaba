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
- **What the load's peak is made of** (``pool_stats``: the pool's own high-water marks, which NVML
  sampling can miss). In use at most 5.91 GiB of the pool in every variant measured, reserved 6.03
  or 6.19 GiB; trimming the pool every 50 ms during the load (tried on the H100, tenth session) left
  both as they were, since a trim can only hand back memory no allocation uses. The rest of the
  load's peak is outside the pool: the CUDA context (0.60 GiB) and about 1.26 GiB more. torch's
  cache, which reached 2.13 GiB while LMDeploy read the checkpoint, is not that: with it off
  (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``, H200, eleventh session) the peak less the pool's
  reservation was the same to the byte.

All are best effort: where the CUDA 12 runtime that TurboMind links cannot be found or refuses, the
engine loads as before, and the result says so.
"""

from __future__ import annotations

import ctypes
import logging
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
