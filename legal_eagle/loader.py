"""From settings to a ready engine: choose the backend, prepare the weights, load.

    settings ─▶ weights (ModelScope or local) ─▶ convert (InternLM2 → Llama) ─▶ AWQ (first start) ─▶ engine

This is the ``preparer`` that ``ModelService`` runs in the background; ``progress`` is
its reporting callback, so every stage shows on the page and in the log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path

from legal_eagle.compare import EngineProvider, FakeProvider, UnavailableProvider
from legal_eagle.config import Settings
from legal_eagle.engines import resolve_backend
from legal_eagle.engines.base import Engine
from legal_eagle.errors import EngineError, PlatformError
from legal_eagle.planner import Plan
from legal_eagle.service import ModelService, ProgressFn

log = logging.getLogger(__name__)


class Checkpoints:
    """The prepared 4-bit and fp16 directories, once known: ``load_engine`` sets, the comparison reads.

    Also how to load the chat engine again (``reload``), for a comparison that needs the whole GPU.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirs: tuple[Path, Path] | None = None
        self._reload: Callable[[], Engine] | None = None

    def set(self, awq_dir: Path, fp16_dir: Path, reload: Callable[[], Engine] | None = None) -> None:
        """Record the directories the chat engine (4-bit) and a comparison (fp16) load, and the chat's loader."""
        with self._lock:
            self._dirs = (Path(awq_dir), Path(fp16_dir))
            self._reload = reload

    def reload(self) -> Engine:
        """Load the chat engine again, as ``load_engine`` did.

        Raises:
            EngineError: nothing was recorded to reload.
        """
        with self._lock:
            reload = self._reload
        if reload is None:
            raise EngineError("无法重新加载聊天模型（没有记录加载方式），请重启应用。", "no reload recorded")
        return reload()

    def get(self) -> tuple[Path, Path] | None:
        """``(awq_dir, fp16_dir)``, or None before the model is prepared."""
        with self._lock:
            return self._dirs


def load_engine(settings: Settings, progress: ProgressFn, checkpoints: Checkpoints | None = None) -> Engine:
    """Prepare and load the chat engine the settings ask for.

    Args:
        settings: the run's settings (model source, format, backend, engine sizes).
        progress: ``(stage, fraction, detail)`` callback for the start page.
        checkpoints: filled with the 4-bit and fp16 directories for the comparison tab; the
            chat engine's KV-cache share is then planned so that the fp16 engine can fit too.

    Returns:
        The loaded engine.

    Raises:
        ModelPreparationError: the model cannot be found, downloaded, converted or quantized.
        EngineError: the engine cannot load it (too little GPU memory, no GPU for TurboMind...).
        PlatformError: the NVIDIA driver cannot run the installed CUDA builds (said before any download).
    """
    if settings.backend != "fake":
        check_machine(local_engine=settings.backend != "remote")
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

        share = settings.cache_max_entry_count
        comparable = (checkpoints is not None and model_format == "awq"
                      and prepared.fp16_path != prepared.path_for_engine)
        if comparable:
            share = _chat_share(prepared.path_for_engine, prepared.fp16_path, share)
        load = partial(
            TurbomindEngine.load,
            Path(prepared.path),
            model_format=model_format,  # type: ignore[arg-type]
            session_len=settings.session_len,
            cache_max_entry_count=share,
            quant_policy=settings.quant_policy,  # type: ignore[arg-type]
            max_batch_size=settings.max_batch_size,
            tp=settings.tp,
            enable_prefix_caching=settings.enable_prefix_caching,
            cache_generation=settings.cache_generation,
            name=_display_name(settings, model_format),
            gemm_tuning_dir=settings.gemm_tuning_path,
        )
        engine = load()
        if comparable:
            assert checkpoints is not None
            checkpoints.set(prepared.path_for_engine, prepared.fp16_path, reload=load)
        return engine
    from legal_eagle.engines.transformers import TransformersEngine

    return TransformersEngine.load(Path(prepared.path), context_len=settings.session_len,
                                   name=_display_name(settings, "hf"))


def check_machine(local_engine: bool = True) -> None:
    """Log the driver / torch / TurboMind CUDA report; raise ``PlatformError`` when CUDA cannot work.

    Hosted GPUs often run a driver older than the wheels' CUDA build, and then torch or TurboMind
    fail much later with a cryptic CUDA error (or ``auto`` silently falls back to the CPU). This
    says so at start, with the fix, on the start page and in the log.
    """
    from legal_eagle.platform import collect_platform

    report = collect_platform(local_engine=local_engine)
    report.log(log)
    errors = [f for f in report.findings if f.level == "error"]
    if errors:
        raise PlatformError("\n".join(f.zh for f in errors), "; ".join(f.en for f in errors))


def _chat_share(awq_dir: Path, fp16_dir: Path, wanted: float) -> float:
    """The chat engine's KV-cache share: what the comparison plan leaves, never more than asked for."""
    from legal_eagle.planner import plan_before_chat_load

    try:
        plan = plan_before_chat_load(awq_dir, fp16_dir, wanted)
    except (OSError, ValueError) as exc:  # unreadable sizes: the chat engine comes first
        log.warning("comparison plan failed before loading (%s): chat KV share stays %.2f", exc, wanted)
        return wanted
    share = min(wanted, plan.chat_cache_share) if plan.chat_cache_share is not None else wanted
    log.info("comparison plan: %s; chat engine KV-cache share %.3f (asked %.2f)", plan.mode, share, wanted)
    return share


def comparison_provider(settings: Settings, service: ModelService, checkpoints: Checkpoints) -> EngineProvider:
    """Where the comparison tab gets its fp16 engine on this run (the 4-bit one is the chat's).

    Args:
        settings: the run's settings (backend and format decide what can be compared).
        service: the chat engine's service (the plan needs to know whether it is loaded).
        checkpoints: filled by ``load_engine`` once the model is prepared.

    Returns:
        A memory-planned TurboMind provider for the 4-bit TurboMind run, scripted engines for
        ``--backend fake``, and otherwise a provider that says why no comparison is possible.
    """
    backend = resolve_backend(settings.backend)
    if backend == "fake":
        from legal_eagle.engines.fake import FakeEngine

        stand_in = FakeEngine(context_len=settings.session_len, name="scripted fp16 stand-in (not a model)")
        scripted = Plan("both-resident", "模拟引擎（--backend fake）：两边都是脚本化的测试文本，不是模型。")
        return FakeProvider(stand_in, plan_value=scripted)
    if backend == "turbomind" and settings.model_format == "awq":
        from legal_eagle.planner import PAUSE_REASON, turbomind_provider

        def suspend_chat(say: Callable[[str], None]) -> AbstractContextManager[None]:
            return service.suspended(checkpoints.reload, PAUSE_REASON, progress=say)

        return turbomind_provider(checkpoints.get, lambda: service.engine_or_none is not None,
                                  session_len=settings.session_len, quant_policy=settings.quant_policy,
                                  suspend_chat=suspend_chat if settings.compare_pause_chat else None,
                                  gemm_tuning_dir=settings.gemm_tuning_path)
    reasons = {
        "transformers": "fp16 与 4-bit 对比需要 NVIDIA GPU 上的 LMDeploy TurboMind；本机用 transformers 引擎，"
                        "没有 4-bit 模型可比。聊天功能不受影响。",
        "remote": "远程推理模式（--backend remote）下本进程不加载模型，无法对比；"
                  "请在推理服务所在的 GPU 机器上运行对比。",
        "turbomind": {"fp8": "当前以 8 比特 FP8 权重运行（--model-format fp8），没有 4-bit 模型可比；"
                             "用 --model-format awq 启动即可对比 fp16 与 4-bit。聊天功能不受影响。"}.get(
            settings.model_format,
            "当前以 fp16 运行（--model-format hf），没有 4-bit 模型可比；用 --model-format awq 启动即可对比。"),
    }
    return UnavailableProvider(reasons[backend])


def _display_name(settings: Settings, model_format: str) -> str:
    """A short model label for the page: the model id's last part plus the format."""
    base = Path(settings.model_path.rstrip("/")).name or settings.model_path
    label = {"awq": "4-bit AWQ", "fp8": "8-bit FP8"}.get(model_format, "fp16")
    return f"{base} ({label})"
