"""Helpers of the GPU tests (no fixtures here): TurboMind's presence, its idle check, the tiny shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# TurboMind wants head_dim 128 and sizes that are multiples of the AWQ group (128).
TINY_SHAPE = {"hidden_size": 512, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 1024}


def turbomind_available() -> bool:
    """True where LMDeploy's TurboMind module loads (an NVIDIA GPU and driver)."""
    try:
        from lmdeploy import turbomind

        return bool(turbomind.is_available())
    except Exception:  # any import failure means: no TurboMind here
        return False


def engine_idle(engine: Any) -> bool:
    """TurboMind's own view: no request holds a handle and the scheduler has no sequence."""
    core = engine._pipe.async_engine
    metrics = core.engine.get_schedule_metrics()
    return core.session_mgr.request_handle_pool.num_dispatched == 0 and metrics.active_seqs == 0


def tiny_fp16(tmp_path_factory: Any, name: str) -> Path:
    """A tiny RANDOM fp16 checkpoint in InternLM2 format, built on the GPU."""
    from legal_eagle.tiny_model import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp(name) / "internlm2-fp16", device="cuda", **TINY_SHAPE)
