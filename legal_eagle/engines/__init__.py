"""Engines behind one protocol (``base.Engine``); ``resolve_backend`` picks one for this machine."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def turbomind_available() -> bool:
    """True when LMDeploy's TurboMind extension loads and sees an NVIDIA GPU.

    Any failure to load it (missing module, a native library that does not load) means no
    TurboMind here; the planner, the tests' skip marks and the backend choice all ask this.
    """
    try:
        from lmdeploy import turbomind

        return bool(turbomind.is_available())
    except Exception as exc:
        log.debug("TurboMind is not loadable here: %r", exc)
        return False


def resolve_backend(requested: str) -> str:
    """The backend to use: ``auto`` becomes turbomind where it can run, else transformers.

    Args:
        requested: one of auto, turbomind, transformers, fake.

    Returns:
        The concrete backend name.
    """
    if requested != "auto":
        return requested
    backend = "turbomind" if turbomind_available() else "transformers"
    if backend == "transformers":
        log.warning("TurboMind is not available here (no NVIDIA GPU or CUDA libraries): using the slow "
                    "transformers engine with fp16/fp32 weights")
    return backend
