"""Decide, before anything is loaded, whether an fp16 and a 4-bit engine can share this GPU.

TurboMind aborts the whole process when a load runs out of GPU memory (no exception reaches
Python), so the comparison tab plans from NVML's free memory and the checkpoints' sizes
first. ``plan_comparison`` is pure; ``PlannedProvider`` follows a plan: it loads the fp16
engine when a comparison needs it, keeps it (both-resident) or frees it afterwards
(time-shared), and re-plans with fresh numbers before every load. Where the two cannot be
on the card together but the fp16 engine fits alone (a 24 GB A10: 9.4 + 18.1 GB), the plan
is "exclusive": for the fp16 half of a comparison the 4-bit chat engine is closed (chat
answers wait, with a message; running ones finish first) and reloaded afterwards.

Margins (all documented defaults, overridable per call):

- ``ENGINE_OVERHEAD_BYTES`` (2 GiB per engine): TurboMind's buffers beyond the weights
  (activations, GEMM workspaces, sampling buffers). Measured on an H100 at InternLM2-7B's
  shape: fp16 18.1 GB = 15.5 weights + ~1.3 KV + ~1.3 buffers; 4-bit 9.4 GB = ~4.5-5.2
  weights + ~1.5 KV + ~2.7-3.4 buffers and CUDA context.
- ``CONTEXT_BYTES`` (1 GiB, once per process): the CUDA context and cuBLAS workspaces of
  the first engine; a second engine in the same process shares them.
- ``KV_MIN_BYTES`` (1 GiB): the smallest useful KV cache: 8192 tokens of a 7B GQA model
  (32 layers x 8 KV heads x 128 dims x K,V x 2 bytes = 128 KiB a token).
- reserve: ``max(1 GiB, 3% of the card)`` always left free (fragmentation, NVML lag).
- resident headroom: ``max(2 GiB, 10% of the card)`` that must stay free for the fp16
  engine to stay loaded for good (and, planned before the chat engine loads, the chat
  engine must still get ``CHAT_KV_GOOD_BYTES`` of KV cache, 4 GiB). Otherwise it is
  loaded only for a comparison (under a lock) and freed afterwards: the card is full only
  during a comparison, so a lazy allocation of the chat engine (which would abort the
  process on a full card) can meet it only then, and the chat engine gets the headroom
  as KV cache.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from legal_eagle import metrics
from legal_eagle.engines import turbomind_available as _turbomind_available
from legal_eagle.engines.base import Engine
from legal_eagle.errors import GpuMemoryError

log = logging.getLogger(__name__)

GiB = 1024**3
ENGINE_OVERHEAD_BYTES = 2 * GiB
CONTEXT_BYTES = 1 * GiB
KV_MIN_BYTES = 1 * GiB
KV_TARGET_BYTES = 2 * GiB
CHAT_KV_GOOD_BYTES = 4 * GiB
MIN_SHARE, MAX_SHARE = 0.01, 0.95
Mode = Literal["both-resident", "time-shared", "exclusive", "unavailable"]
MODE_LABELS: dict[str, str] = {"both-resident": "两个模型同时常驻显存", "time-shared": "分时加载 fp16 模型",
                               "exclusive": "轮流独占显存（对比期间聊天暂停）", "unavailable": "对比不可用"}
PAUSE_REASON = ("有用户正在运行 fp16 与 4-bit 精度对比：这张显卡只放得下一个模型，聊天暂停约一到两分钟，"
                "您的问题会在对比结束后自动开始回答。")
Progress = Callable[[str], None]


def _gb(n: float | None) -> str:
    """Bytes as '12.3 GB' (decimal, as card sizes are sold)."""
    return "未知" if n is None else f"{n / 1e9:.1f} GB"


@dataclass(frozen=True)
class Plan:
    """What fits, and the KV-cache shares to load with.

    Attributes:
        mode: "both-resident", "time-shared" or "unavailable".
        reason: why, in Chinese, with the numbers (shown on the tab).
        fp16_cache_share: ``cache_max_entry_count`` for the fp16 engine (None when unavailable).
        chat_cache_share: ``cache_max_entry_count`` to load the 4-bit chat engine with, when it
            is not loaded yet (None when it is, or when nothing fits).
        fp16_kv_bytes: the fp16 engine's KV-cache budget.
        fp16_need_bytes: the least the fp16 engine needs (weights + buffers + minimal KV cache).
        chat_need_bytes: what the chat engine still needs (0 when already loaded).
        free_bytes, total_bytes: the GPU's memory when planned (None: no GPU).
        reserve_bytes, headroom_bytes: the margins used.
    """

    mode: Mode
    reason: str
    fp16_cache_share: float | None = None
    chat_cache_share: float | None = None
    fp16_kv_bytes: int | None = None
    fp16_need_bytes: int = 0
    chat_need_bytes: int = 0
    free_bytes: int | None = None
    total_bytes: int | None = None
    reserve_bytes: int = 0
    headroom_bytes: int = 0

    @property
    def available(self) -> bool:
        """True when a comparison can run."""
        return self.mode != "unavailable"

    def describe(self) -> str:
        """Markdown for the tab: the mode, why, and the numbers."""
        icon = {"both-resident": "🟢", "time-shared": "🟡", "exclusive": "🟠", "unavailable": "🔴"}[self.mode]
        lines = [f"{icon} **显存规划：{MODE_LABELS[self.mode]}**", "", self.reason]
        if self.total_bytes is not None:
            lines += ["", f"显卡共 {_gb(self.total_bytes)}，规划时空闲 {_gb(self.free_bytes)}；"
                          f"fp16 模型至少需要 {_gb(self.fp16_need_bytes)}，"
                          f"保留余量 {_gb(self.reserve_bytes)}。"]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (for logs and the GPU script)."""
        return asdict(self)


def _share(kv_bytes: int, free_after_weights: int) -> float:
    """``cache_max_entry_count`` that gives at most ``kv_bytes`` when TurboMind sees that much free."""
    share = min(MAX_SHARE, max(MIN_SHARE, kv_bytes / max(free_after_weights, 1)))
    return max(MIN_SHARE, math.floor(share * 10_000) / 10_000)  # rounded down: never more than planned


def plan_comparison(
    free_bytes: int | None,
    total_bytes: int | None,
    awq_weights_bytes: int,
    fp16_weights_bytes: int,
    chat_engine_loaded: bool,
    *,
    chat_cache_share_wanted: float = 0.5,
    overhead_bytes: int = ENGINE_OVERHEAD_BYTES,
    context_bytes: int = CONTEXT_BYTES,
    kv_min_bytes: int = KV_MIN_BYTES,
    kv_target_bytes: int = KV_TARGET_BYTES,
    chat_kv_good_bytes: int = CHAT_KV_GOOD_BYTES,
    turbomind_available: bool = True,
    chat_held_bytes: int | None = None,
    allow_exclusive: bool = True,
) -> Plan:
    """Decide how the fp16 engine can run beside the 4-bit chat engine on one GPU.

    Args:
        free_bytes: free memory of the GPU now (NVML), None without a GPU.
        total_bytes: the GPU's total memory, None without a GPU.
        awq_weights_bytes: the 4-bit checkpoint's weights (bytes on the GPU).
        fp16_weights_bytes: the fp16 checkpoint's weights (bytes on the GPU).
        chat_engine_loaded: True when the 4-bit engine already holds its memory (then
            ``free_bytes`` is what it left); False to plan before loading it.
        chat_cache_share_wanted: the chat engine's configured ``cache_max_entry_count``; the
            plan gives it at most this and less when the fp16 engine needs the room.
        overhead_bytes: TurboMind buffers per engine beyond the weights.
        context_bytes: CUDA context of the first engine in the process.
        kv_min_bytes: the smallest KV cache an engine is loaded with.
        kv_target_bytes: the fp16 engine's KV cache when there is room.
        chat_kv_good_bytes: planning before the chat engine loads, the fp16 engine stays resident
            only if the chat engine still gets this much KV cache (or its wanted share, if less).
        turbomind_available: False when TurboMind cannot run here.
        chat_held_bytes: GPU memory the loaded chat engine holds (what closing it frees), for
            the "exclusive" plan; None: unknown (no exclusive plan with a loaded chat engine).
        allow_exclusive: False when the host does not let a comparison pause the chat.

    Returns:
        The plan; "unavailable" plans carry the reason in Chinese.
    """
    if free_bytes is None or total_bytes is None or not turbomind_available:
        return Plan("unavailable", "未检测到可用的 NVIDIA GPU（或 TurboMind 推理引擎不可用），"
                                   "无法加载 fp16 对比模型。聊天功能不受影响。")
    if not 0 < chat_cache_share_wanted <= 1:
        raise ValueError(f"chat_cache_share_wanted must be in (0, 1], got {chat_cache_share_wanted}")
    reserve = max(1 * GiB, int(0.03 * total_bytes))
    headroom = max(2 * GiB, int(0.10 * total_bytes))
    fp16_fixed = fp16_weights_bytes + overhead_bytes  # the chat engine, loaded first, pays the context
    fp16_need = fp16_fixed + kv_min_bytes
    chat_fixed = 0 if chat_engine_loaded else awq_weights_bytes + overhead_bytes + context_bytes
    chat_need = 0 if chat_engine_loaded else chat_fixed + kv_min_bytes
    room = free_bytes - reserve - chat_need  # what the fp16 engine may use, the chat engine at its minimum
    common = dict(fp16_need_bytes=fp16_need, chat_need_bytes=chat_need, free_bytes=free_bytes,
                  total_bytes=total_bytes, reserve_bytes=reserve, headroom_bytes=headroom)
    if room < fp16_need:
        # Alone on the card? The chat engine's CUDA context stays when it closes.
        alone = free_bytes if not chat_engine_loaded else (
            None if chat_held_bytes is None else free_bytes + max(0, chat_held_bytes - context_bytes))
        fits_alone = alone is not None and alone - reserve >= fp16_need
        if allow_exclusive and fits_alone:
            assert alone is not None
            fp16_kv = max(kv_min_bytes, min(kv_target_bytes, alone - reserve - fp16_fixed))
            reason = (f"显存只够放下一个模型：fp16 模型（约 {_gb(fp16_fixed + fp16_kv)}）"
                      "与 4-bit 聊天模型无法同时驻留。"
                      "对比时先卸载 4-bit 聊天模型，fp16 独占显卡回答，然后释放它、重新加载 4-bit 模型回答"
                      "（只能“依次计时”，每次对比约多花半分钟到一分钟加载）；"
                      "期间聊天暂停，用户的问题会排队等待，正在生成的回答会先完成。")
            return Plan("exclusive", reason, fp16_cache_share=_share(fp16_kv, alone - fp16_weights_bytes),
                        fp16_kv_bytes=fp16_kv, **common)  # type: ignore[arg-type]
        holder = "" if not chat_engine_loaded else "（4-bit 聊天模型已加载并占用了一部分）"
        chat_part = f"、4-bit 聊天模型约 {_gb(chat_need)}" if chat_need else ""
        reason = (f"显存不足：显卡共 {_gb(total_bytes)}，空闲 {_gb(free_bytes)}{holder}；"
                  f"fp16 模型至少需要 {_gb(fp16_need)}（权重 {_gb(fp16_weights_bytes)} + 引擎缓冲 "
                  f"{_gb(overhead_bytes)} + KV 缓存 {_gb(kv_min_bytes)}）{chat_part}，"
                  f"另需保留 {_gb(reserve)}。")
        if fits_alone:  # only the host's setting stands in the way
            reason += ("fp16 模型只能在卸载 4-bit 聊天模型后独占显卡运行，而主机已设置对比期间不暂停聊天"
                       "（--no-compare-pause-chat / LE_COMPARE_PAUSE_CHAT=0），"
                       "因此精度对比不可用；聊天功能不受影响。")
        elif alone is None:
            reason += ("fp16 与 4-bit 两个模型无法在这张卡上同时运行（聊天模型占用的显存未知，无法规划轮流加载），"
                       "因此精度对比不可用；聊天功能不受影响。")
        else:
            reason += ("即使卸载 4-bit 聊天模型，fp16 模型也放不下，因此精度对比不可用；聊天功能不受影响。"
                       "如需对比，请使用显存更大的 GPU（例如 24 GB 及以上）。")
        if chat_engine_loaded and free_bytes + awq_weights_bytes + overhead_bytes > fp16_need + reserve:
            reason += "（若在加载聊天模型前规划并调小其 KV 缓存比例 cache_max_entry_count，可能放得下。）"
        return Plan("unavailable", reason, **common)  # type: ignore[arg-type]
    resident = room >= fp16_fixed + kv_target_bytes + headroom
    seen_by_chat = free_bytes - awq_weights_bytes  # the most TurboMind can see free after the chat weights
    if resident and not chat_engine_loaded:  # staying resident must not starve the chat engine's KV cache
        good = min(chat_cache_share_wanted * seen_by_chat, chat_kv_good_bytes)
        resident = room - fp16_fixed - kv_target_bytes - headroom + kv_min_bytes >= good
    mode: Mode = "both-resident" if resident else "time-shared"
    keep_free = headroom if resident else 0
    fp16_kv = max(kv_min_bytes, min(kv_target_bytes, room - fp16_fixed - keep_free))
    chat_share: float | None = None
    fp16_free_upper = free_bytes  # the most TurboMind can see free when the fp16 engine loads
    if not chat_engine_loaded:
        spare = max(0, room - fp16_fixed - fp16_kv - keep_free)  # beyond the chat engine's minimum
        chat_kv = int(min(chat_cache_share_wanted * seen_by_chat, kv_min_bytes + spare))
        chat_share = _share(chat_kv, seen_by_chat)
        chat_kv_low = int(chat_share * (seen_by_chat - overhead_bytes - context_bytes))
        fp16_free_upper = free_bytes - awq_weights_bytes - chat_kv_low
    fp16_share = _share(fp16_kv, fp16_free_upper - fp16_weights_bytes)
    if resident:
        reason = (f"显存充足：fp16 模型（约 {_gb(fp16_fixed + fp16_kv)}）与 4-bit 聊天模型可同时常驻显存，"
                  "首次对比时加载 fp16 模型，之后无需重新加载。")
    else:
        reason = (f"显存只够临时容纳 fp16 模型（约 {_gb(fp16_fixed + fp16_kv)}）：每次对比时按需加载"
                  "（大约需要十几秒到一分钟），对比结束后立即释放；期间 4-bit 聊天模型照常工作。"
                  "同一时间只进行一个对比。")
    return Plan(mode, reason, fp16_cache_share=fp16_share, chat_cache_share=chat_share, fp16_kv_bytes=fp16_kv,
                **common)  # type: ignore[arg-type]


def weights_bytes(model_dir: Path) -> int:
    """Bytes a checkpoint's weights take on the GPU (fp32 files load as fp16).

    Raises:
        ValueError: the folder has no config.json or no weight files.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"no config.json in {model_dir}")
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    size = size or sum(p.stat().st_size for p in model_dir.glob("*.bin"))
    if not size:
        raise ValueError(f"no *.safetensors or *.bin weights in {model_dir}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    return size // 2 if config.get("torch_dtype", config.get("dtype")) == "float32" else size



class PlannedProvider:
    """Hands out the fp16 engine as the plan allows (implements ``compare.EngineProvider``).

    Args:
        loader: loads the fp16 engine given its ``cache_max_entry_count`` (e.g. a
            ``TurbomindEngine.load`` partial); called only after the plan allows it.
        sizes: the checkpoints' GPU sizes ``(awq_bytes, fp16_bytes)`` (see ``weights_bytes``),
            or None while they are not on disk yet (the model is still being prepared).
        chat_engine_loaded: tells whether the 4-bit chat engine holds its memory now.
        gpu_free_total: (free, total) of the GPU, or None without one.
        process_memory: GPU memory this process holds (NVML), to measure what a load took.
        turbomind_available: whether TurboMind runs here (checked lazily by default).
        suspend_chat: closes the 4-bit chat engine for the block and reloads it after
            (``ModelService.suspended``), taking Chinese progress lines; None: never ("exclusive"
            plans are then not made).
        chat_memory: what closing the chat engine would free (default: this process's GPU
            memory while no fp16 engine is loaded).
        plan_options: more keyword arguments for ``plan_comparison``.
    """

    def __init__(self, loader: Callable[[float], Engine], *, sizes: Callable[[], tuple[int, int] | None],
                 chat_engine_loaded: Callable[[], bool],
                 gpu_free_total: Callable[[], tuple[int, int] | None] = metrics.gpu_free_total,
                 process_memory: Callable[[], int | None] = metrics.gpu_memory_used_by_process,
                 turbomind_available: Callable[[], bool] = _turbomind_available,
                 suspend_chat: Callable[[Progress], AbstractContextManager[None]] | None = None,
                 chat_memory: Callable[[], int | None] | None = None,
                 **plan_options: object) -> None:
        self._loader = loader
        self._suspend = suspend_chat
        self._chat_memory = chat_memory or process_memory
        self._sizes = sizes
        self._chat_loaded = chat_engine_loaded
        self._gpu = gpu_free_total
        self._process_memory = process_memory
        self._tm = turbomind_available
        self._options = plan_options
        self._lock = threading.Lock()
        self._state = threading.Lock()
        self._engine: Engine | None = None
        self._engine_plan: Plan | None = None
        self._held: int | None = None
        self.loads = 0
        self.last_load_s: float | None = None

    def current_plan(self) -> Plan:
        """A fresh plan from the GPU's memory now (not while the fp16 engine is loaded)."""
        try:
            sizes = self._sizes()
        except (OSError, ValueError) as exc:  # e.g. the fp16 copy was removed after quantization
            log.warning("comparison checkpoints unreadable: %s", exc)
            return Plan("unavailable", "找不到 fp16 或 4-bit 模型文件，无法进行精度对比；聊天功能不受影响。")
        if sizes is None:
            return Plan("unavailable", "模型还在准备中（下载或量化），准备完成后才能规划显存；"
                                       "请稍后点“重新检测显存”。")
        gpu = self._gpu()
        free, total = gpu if gpu is not None else (None, None)
        loaded = self._chat_loaded()
        held = self._chat_memory() if loaded and gpu is not None else None
        options = {"allow_exclusive": self._suspend is not None, **self._options}
        return plan_comparison(free, total, sizes[0], sizes[1], loaded, chat_held_bytes=held,
                               turbomind_available=bool(gpu) and self._tm(), **options)  # type: ignore[arg-type]

    @property
    def plan(self) -> Plan:
        """The plan in force: the one the loaded engine follows, else a fresh one."""
        with self._state:
            if self._engine_plan is not None:
                return self._engine_plan
        return self.current_plan()

    def held_bytes(self) -> int | None:
        """GPU memory the fp16 engine took when it loaded (NVML process delta), None if not loaded."""
        with self._state:
            return self._held if self._engine is not None else None

    @contextmanager
    def acquire(self, progress: Progress | None = None) -> Iterator[Engine]:
        """The fp16 engine for one comparison: loaded now if needed, freed after if time-shared.

        Raises:
            GpuMemoryError: the plan made now does not allow loading it (message in Chinese).
            EngineError: the load failed.
        """
        say = progress or (lambda message: None)
        if not self._lock.acquire(blocking=False):
            say("另一个对比正在使用 fp16 模型，正在等待它结束…")
            self._lock.acquire()
        try:
            plan = None if self._engine is not None else self.current_plan()
            if plan is not None and plan.mode == "exclusive" and self._suspend is not None:
                with self._suspend(say):
                    engine = self._load(say, exclusive=True)  # planned again: the chat engine is closed now
                    try:
                        yield engine
                    finally:
                        say("正在释放 fp16 模型的显存…")
                        self._unload()
                return
            engine = self._engine if plan is None else self._load(say, plan)
            plan = self._engine_plan
            try:
                yield engine
            finally:
                if plan is not None and plan.mode == "time-shared":
                    say("正在释放 fp16 模型的显存…")
                    self._unload()
        finally:
            self._lock.release()

    def _load(self, say: Progress, plan: Plan | None = None, exclusive: bool = False) -> Engine:
        """Load per ``plan`` (just made) or a fresh one, or refuse; ``exclusive``: the chat engine is closed now."""
        plan = plan or self.current_plan()
        if not plan.available or plan.fp16_cache_share is None:
            raise GpuMemoryError(plan.reason, "comparison plan: unavailable")
        if exclusive:  # the numbers are fresh (chat engine closed); the mode is what the comparison does
            plan = replace(plan, mode="exclusive")
        say(f"正在加载 fp16 模型（{MODE_LABELS[plan.mode]}，KV 缓存比例 {plan.fp16_cache_share}）…")
        before = self._process_memory()
        start = time.monotonic()
        engine = self._loader(plan.fp16_cache_share)
        self.last_load_s = time.monotonic() - start
        after = self._process_memory()
        with self._state:
            self._engine, self._engine_plan = engine, plan
            self._held = after - (before or 0) if after is not None else engine.gpu_memory_bytes()
        self.loads += 1
        log.info("fp16 comparison engine loaded in %.1f s (%s, holds %s)", self.last_load_s, plan.mode,
                 metrics.format_bytes(self._held))
        say(f"fp16 模型已加载，用时 {self.last_load_s:.0f} 秒。")
        return engine

    def _unload(self) -> None:
        """Close the fp16 engine and forget it."""
        with self._state:
            engine, self._engine, self._engine_plan, self._held = self._engine, None, None, None
        if engine is not None:
            engine.close()
            log.info("fp16 comparison engine released")

    def close(self) -> None:
        """Release the fp16 engine if it is loaded."""
        with self._lock:
            self._unload()


def plan_before_chat_load(awq_dir: Path, fp16_dir: Path, wanted_share: float) -> Plan:
    """The plan from this GPU's free memory now, before the chat engine loads (NVML).

    Load the chat engine with ``plan.chat_cache_share or wanted_share``.

    Args:
        awq_dir: the 4-bit checkpoint the chat engine will load.
        fp16_dir: the fp16 checkpoint the comparison will load.
        wanted_share: the configured ``cache_max_entry_count`` of the chat engine.

    Returns:
        The plan (its ``chat_cache_share`` leaves room for the fp16 engine when that can fit).
    """
    gpu = metrics.gpu_free_total()
    free, total = gpu if gpu is not None else (None, None)
    return plan_comparison(free, total, weights_bytes(awq_dir), weights_bytes(fp16_dir),
                           chat_engine_loaded=False, chat_cache_share_wanted=wanted_share,
                           turbomind_available=_turbomind_available())


def turbomind_provider(checkpoints: Callable[[], tuple[Path, Path] | None],
                       chat_engine_loaded: Callable[[], bool], *, session_len: int, quant_policy: int = 0,
                       max_batch_size: int = 4,
                       suspend_chat: Callable[[Progress], AbstractContextManager[None]] | None = None,
                       gemm_tuning_dir: Path | None = None) -> PlannedProvider:
    """A ``PlannedProvider`` that loads the fp16 checkpoint into TurboMind in this process.

    Args:
        checkpoints: ``(awq_dir, fp16_dir)`` once the model is prepared, None before.
        chat_engine_loaded: whether the 4-bit chat engine is loaded now.
        session_len: the fp16 engine's context window (use the chat engine's).
        quant_policy: KV-cache precision (0, 4 or 8), as the chat engine's.
        max_batch_size: answers the fp16 engine decodes at once (a comparison needs 1).
        suspend_chat: as ``PlannedProvider``'s (None: no "exclusive" plan).
        gemm_tuning_dir: where TurboMind keeps its GEMM tuning (``TurbomindEngine.load``'s).

    Returns:
        The provider; nothing is loaded until a comparison asks.
    """
    cache: dict[tuple[Path, Path], tuple[int, int]] = {}

    def sizes() -> tuple[int, int] | None:
        dirs = checkpoints()
        if dirs is None:
            return None
        if dirs not in cache:
            cache[dirs] = (weights_bytes(dirs[0]), weights_bytes(dirs[1]))
        return cache[dirs]

    def load(share: float) -> Engine:
        from legal_eagle.engines.turbomind import TurbomindEngine

        dirs = checkpoints()
        if dirs is None:
            raise GpuMemoryError("模型还在准备中，请稍后再试。", "fp16 checkpoint not prepared yet")
        return TurbomindEngine.load(dirs[1], model_format="hf", session_len=session_len,
                                    cache_max_entry_count=share, quant_policy=quant_policy,  # type: ignore[arg-type]
                                    max_batch_size=max_batch_size, tp=1, name="fp16",
                                    gemm_tuning_dir=gemm_tuning_dir)

    return PlannedProvider(load, sizes=sizes, chat_engine_loaded=chat_engine_loaded, suspend_chat=suspend_chat)
