"""From settings to a ready engine: choose the backend, prepare the weights, load.

    settings ─▶ weights (ModelScope or local) ─▶ convert (InternLM2 → Llama) ─▶ AWQ (first start) ─▶ engine

This is the ``preparer`` that ``ModelService`` runs in the background; ``progress`` is
its reporting callback, so every stage shows on the page and in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path

from legal_eagle.config import Settings
from legal_eagle.engines import resolve_backend
from legal_eagle.engines.base import Engine
from legal_eagle.service import ProgressFn

log = logging.getLogger(__name__)


def load_engine(settings: Settings, progress: ProgressFn) -> Engine:
    """Prepare and load the chat engine the settings ask for.

    Args:
        settings: the run's settings (model source, format, backend, engine sizes).
        progress: ``(stage, fraction, detail)`` callback for the start page.

    Returns:
        The loaded engine.

    Raises:
        ModelPreparationError: the model cannot be found, downloaded, converted or quantized.
        EngineError: the engine cannot load it (too little GPU memory, no GPU for TurboMind...).
    """
    backend = resolve_backend(settings.backend)
    if backend == "fake":
        from legal_eagle.engines.fake import FakeEngine

        log.warning("backend=fake: answers are SCRIPTED test text, not a model")
        return FakeEngine(context_len=settings.session_len, name="scripted test engine (not a model)")
    if backend == "remote":
        from legal_eagle.engines.remote import RemoteEngine

        progress("loading", None, f"连接推理服务 {settings.remote_url}")
        return RemoteEngine.connect(settings.remote_url or "", api_key=settings.api_key, wait_s=600.0,
                                    on_wait=lambda why: progress("loading", None, why),
                                    context_len=settings.session_len,
                                    max_connections=max(128, settings.concurrency_limit))
    from legal_eagle.prepare import prepare_model

    # Without TurboMind the 4-bit AWQ format cannot run (transformers has no TurboMind kernels).
    model_format = settings.model_format if backend == "turbomind" else "hf"
    if model_format != settings.model_format:
        log.warning("backend=%s cannot run %s weights: using fp16/fp32 weights", backend, settings.model_format)
    prepared = prepare_model(
        settings.model_path,
        revision=settings.revision,
        cache_dir=settings.cache_path,
        model_format=model_format,
        calib=settings.calibration_spec(),
        min_agreement=settings.min_agreement,
        on_progress=progress,
    )
    progress("loading", None, Path(prepared.path).name)
    if backend == "turbomind":
        from legal_eagle.engines.turbomind import TurbomindEngine

        return TurbomindEngine.load(
            Path(prepared.path),
            model_format=model_format,  # type: ignore[arg-type]
            session_len=settings.session_len,
            cache_max_entry_count=settings.cache_max_entry_count,
            quant_policy=settings.quant_policy,  # type: ignore[arg-type]
            max_batch_size=settings.max_batch_size,
            tp=settings.tp,
            enable_prefix_caching=settings.enable_prefix_caching,
            name=_display_name(settings, model_format),
        )
    from legal_eagle.engines.transformers import TransformersEngine

    return TransformersEngine.load(Path(prepared.path), context_len=settings.session_len,
                                   name=_display_name(settings, "hf"))


def _display_name(settings: Settings, model_format: str) -> str:
    """A short model label for the page: the model id's last part plus the format."""
    base = Path(settings.model_path.rstrip("/")).name or settings.model_path
    return f"{base} ({'4-bit AWQ' if model_format == 'awq' else 'fp16'})"
