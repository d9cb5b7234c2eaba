"""The model service: prepares an engine in the background and reports where it stands.

The web page comes up at once; download, conversion, quantization and loading run in a
thread and report progress here, which the UI and the health endpoint read. Nothing in
this module is global: ``app.py`` creates one service per engine and passes it on.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from legal_eagle.engines.base import Engine
from legal_eagle.errors import EngineError, GpuMemoryError, LegalEagleError

log = logging.getLogger(__name__)

Stage = Literal["waiting", "downloading", "converting", "quantizing", "verifying", "loading", "ready", "failed"]
STAGE_LABELS: dict[str, str] = {
    "waiting": "等待中",
    "downloading": "正在下载模型权重",
    "converting": "正在转换模型格式",
    "quantizing": "正在进行 4-bit AWQ 量化（首次启动需要几分钟）",
    "verifying": "正在校验量化模型",
    "loading": "正在加载模型到显存",
    "ready": "模型已就绪",
    "failed": "模型准备失败",
}
# The preparer's stage names (legal_eagle.prepare: download, wait, convert, quantize, check) as the page's.
PREPARE_STAGES = {"download": "downloading", "wait": "waiting", "convert": "converting", "quantize": "quantizing",
                  "check": "verifying"}
LOADING_SLOW_S = 300.0  # a 7B model loads into TurboMind in 5-20 s (H200); minutes mean something is wrong
SLOW_LOAD_HINT = ("加载时间异常长（通常不到 1 分钟）：若一直停在这里，常见原因是 KV cache 太小，"
                  "TurboMind 无法建立推理引擎（在 H200 上实测：缓存只有约 5,000 个 token 时会一直卡住）。"
                  "请调大 --cache-max-entry-count 后重启。")
ProgressFn = Callable[[str, "float | None", str], None]
Preparer = Callable[[ProgressFn], Engine]


@dataclass(frozen=True)
class Status:
    """A snapshot of the service's state.

    Attributes:
        stage: one of ``STAGE_LABELS``.
        fraction: progress of the stage in [0, 1], or None when unknown.
        detail: extra words (file name, sizes, the failure's fix).
        elapsed_s: seconds since preparation started (or that it took, once ready).
        stage_elapsed_s: seconds in the current stage.
    """

    stage: str
    fraction: float | None
    detail: str
    elapsed_s: float
    stage_elapsed_s: float

    @property
    def ready(self) -> bool:
        """True when the engine can answer."""
        return self.stage == "ready"

    def describe(self) -> str:
        """One line in Chinese for the page and the log."""
        label = STAGE_LABELS.get(self.stage, self.stage)
        parts = [label]
        if self.fraction is not None and self.stage not in ("ready", "failed"):
            parts.append(f"{self.fraction:.0%}")
        if self.detail:
            parts.append(self.detail)
        parts.append(f"已用时 {_clock(self.elapsed_s)}")
        if self.stage == "loading" and self.stage_elapsed_s >= LOADING_SLOW_S:
            parts.append(SLOW_LOAD_HINT)
        return " · ".join(parts)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form for the health endpoint."""
        return {"stage": self.stage, "ready": self.ready, "fraction": self.fraction, "detail": self.detail,
                "elapsed_s": round(self.elapsed_s, 1), "stage_elapsed_s": round(self.stage_elapsed_s, 1),
                "message": self.describe()}


class ModelService:
    """Owns one engine and the story of how it got ready.

    Answers take the engine with ``lease()``. On a GPU too small for two models, the comparison
    tab borrows the whole card with ``suspended()``: new answers wait (``paused()`` says why),
    running ones finish, the engine is closed, and reloaded afterwards.
    """

    def __init__(self, preparer: Preparer, name: str = "model", clock: Callable[[], float] = time.monotonic):
        self._preparer = preparer
        self._name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._leases_changed = threading.Condition(self._lock)
        self._leases = 0
        self._paused: str | None = None
        self._engine: Engine | None = None
        self._stage, self._fraction, self._detail = "waiting", None, ""
        self._started = self._stage_started = clock()
        self._finished: float | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    @classmethod
    def ready_with(cls, engine: Engine, name: str = "model") -> ModelService:
        """A service whose engine is already loaded (tests, and engines made elsewhere)."""
        handed = [engine]  # handed over once: a closed engine must not stay referenced here
        service = cls(lambda progress: handed.pop(), name=name)
        service.run()
        return service

    def start(self) -> None:
        """Prepare in a background thread (returns at once)."""
        self._thread = threading.Thread(target=self.run, name=f"prepare-{self._name}", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Prepare in this thread; failures end in the ``failed`` stage, never an exception."""
        with self._lock:
            self._started = self._stage_started = self._clock()
        try:
            engine = self._load_or_fail(lambda: self._preparer(self.report), "preparation", "{}", "内部错误：")
            if engine is not None:
                with self._lock:
                    self._engine = engine
                    self._set("ready", 1.0, "")
                    self._finished = self._clock()
                log.info("%s: ready after %.1f s", self._name, self._finished - self._started)
        finally:
            self._done.set()

    def _load_or_fail(self, load: Callable[[], Engine], what: str, frame: str, internal: str) -> Engine | None:
        """``load()``, or None after putting the service in ``failed`` with a Chinese reason.

        ``frame`` places the reason in the page's message; ``internal`` prefixes an unexpected
        exception's own text (the page must say so instead of dying silently).
        """
        try:
            return load()
        except LegalEagleError as exc:
            log.error("%s: %s failed: %s", self._name, what, exc)
            self._fail(frame.format(exc.user_message))
        except Exception as exc:
            log.exception("%s: %s failed", self._name, what)
            self._fail(frame.format(f"{internal}{type(exc).__name__}: {exc}"))
        return None

    def report(self, stage: str, fraction: float | None = None, detail: str = "") -> None:
        """Progress callback handed to the preparer."""
        stage = PREPARE_STAGES.get(stage, stage)
        with self._lock:
            if stage != self._stage:
                log.info("%s: %s", self._name, STAGE_LABELS.get(stage, stage))
            self._set(stage, fraction, detail)

    def _set(self, stage: str, fraction: float | None, detail: str) -> None:
        if stage != self._stage:
            self._stage_started = self._clock()
        self._stage, self._fraction, self._detail = stage, fraction, detail

    def _fail(self, message: str) -> None:
        with self._lock:
            self._set("failed", None, message)
            self._finished = self._clock()

    def status(self) -> Status:
        """Where preparation stands now."""
        with self._lock:
            now = self._finished if self._finished is not None else self._clock()
            return Status(self._stage, self._fraction, self._detail, now - self._started,
                          now - self._stage_started)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until preparation ends; True when it ended (ready or failed)."""
        return self._done.wait(timeout)

    @property
    def engine(self) -> Engine:
        """The engine, or ``EngineError`` with a Chinese message saying why it is not there."""
        with self._lock:
            engine, paused = self._engine, self._paused
        if paused is not None:
            raise EngineError(paused, "engine paused")
        if engine is None:
            status = self.status()
            if status.stage == "failed":
                raise EngineError(f"模型不可用：{status.detail}", "engine failed to prepare")
            raise EngineError(f"模型还在准备中：{status.describe()}。请稍候再提问，您的输入会保留。",
                              "engine not ready")
        return engine

    @property
    def engine_or_none(self) -> Engine | None:
        """The engine if ready, else None."""
        with self._lock:
            return self._engine

    def paused(self) -> str | None:
        """While a comparison has the GPU to itself: why answers wait, in Chinese; else None."""
        with self._lock:
            return self._paused

    @contextmanager
    def lease(self) -> Iterator[Engine]:
        """The engine for one answer; ``suspended()`` waits until every lease has ended.

        Raises:
            EngineError: not ready, failed, or paused (the message says which, in Chinese).
        """
        while True:
            with self._lock:
                engine = self._engine if self._paused is None else None
                if engine is not None:
                    self._leases += 1
                    break
            self.engine  # noqa: B018 (raises with the reason; returns only if it came back just now: retry)
        try:
            yield engine
        finally:
            with self._lock:
                self._leases -= 1
                self._leases_changed.notify_all()

    @contextmanager
    def suspended(self, reload: Callable[[], Engine], reason: str, drain_timeout_s: float = 120.0,
                  progress: Callable[[str], None] | None = None) -> Iterator[None]:
        """Close the engine for the block's duration (new answers wait), then load it again.

        Args:
            reload: loads the engine again (same checkpoint and settings).
            reason: what waiting users are told, in Chinese.
            drain_timeout_s: how long to wait for running answers to finish.
            progress: Chinese progress lines for the caller's page.

        Raises:
            GpuMemoryError: running answers did not finish in time (nothing was closed).
            EngineError: the engine is not ready, or already suspended.
        """
        say = progress or (lambda message: None)
        with self._lock:
            if self._engine is None or self._paused is not None:
                raise EngineError("模型当前不可用（未就绪或正被另一个对比占用），请稍后再试。", "cannot suspend")
            self._paused = reason
            deadline = self._clock() + drain_timeout_s
            if self._leases:
                say(f"等待 {self._leases} 个正在生成的聊天回答结束…")
            while self._leases and self._clock() < deadline:
                self._leases_changed.wait(min(1.0, max(0.0, deadline - self._clock())))
            if self._leases:
                self._paused = None
                raise GpuMemoryError(f"有 {self._leases} 个聊天回答仍在生成，暂时无法腾出显存进行对比，请稍后再试。",
                                     f"{self._leases} answers still running after {drain_timeout_s:.0f} s")
            engine, self._engine = self._engine, None
        log.info("%s: engine closed for a comparison (%s)", self._name, reason)
        say("正在卸载 4-bit 聊天模型…")
        try:
            engine.close()
            del engine
            gc.collect()
            yield
        finally:
            say("正在重新加载 4-bit 聊天模型…")
            self._restore(reload)

    def _restore(self, reload: Callable[[], Engine]) -> None:
        """Load the engine again after ``suspended``; a failure puts the service in ``failed``."""
        start = self._clock()
        try:
            engine = self._load_or_fail(reload, "reload after the comparison",
                                        "对比结束后重新加载模型失败：{}（请重启应用）", "")
            if engine is not None:
                with self._lock:
                    self._engine = engine
                log.info("%s: engine reloaded in %.1f s", self._name, self._clock() - start)
        finally:
            with self._lock:
                self._paused = None
                self._leases_changed.notify_all()

    def close(self) -> None:
        """Release the engine."""
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()


def _clock(seconds: float) -> str:
    """``m:ss`` for a duration."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
