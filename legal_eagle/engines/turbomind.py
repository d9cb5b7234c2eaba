"""The TurboMind engine: LMDeploy 0.18's CUDA engine, in-process, fp16 or 4-bit AWQ weights.

The prompt goes in as token ids from ``chat_template.render_ids`` (never as text), so a
typed ``<|im_end|>`` stays plain characters. LMDeploy's ``Pipeline.stream_infer`` only takes
text or messages, which it tokenizes itself, so each answer is driven one level lower, on
the pipeline's own event-loop thread: ``AsyncEngine.preprocess(None, session,
input_ids=ids)`` then ``AsyncEngine.generate(request)``. ``stream`` hands the request to
that loop at once, so the prefill runs while the caller still does its own work. A thread-safe
queue hands the outputs to the caller's thread (Gradio runs many ``stream`` calls at once from
worker threads); outputs that queued up meanwhile come as one chunk. Closing the stream aborts
the request in TurboMind (``Session.async_abort``; a request still waiting for a slot is
cancelled) and waits until LMDeploy has returned its slot, so ``active_generations`` and the
engine agree when ``close()`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import queue
import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from legal_eagle import gemm_tuning, gpu_memory, metrics
from legal_eagle.chat_template import render_ids, stop_token_ids
from legal_eagle.config import CACHE_GENERATION
from legal_eagle.engines.base import Chunk, EngineInfo, FinishReason, Message, SamplingParams
from legal_eagle.errors import EngineError, GpuMemoryError

log = logging.getLogger(__name__)

MSG_UNAVAILABLE = ("本机无法运行 TurboMind 推理引擎（需要 NVIDIA GPU 和匹配的驱动）。"
                   "请在有 GPU 的机器上运行，或改用 transformers 引擎。")
MSG_UNSUPPORTED = "TurboMind 不支持这个模型目录中的模型格式，请检查模型文件。"
MSG_MISSING = "找不到模型文件（config.json），请先下载或准备模型。"
MSG_LOAD = "TurboMind 引擎加载模型失败，请检查模型文件是否完整以及显存是否足够。"
MSG_NO_MEMORY = "显卡剩余显存不足，无法加载该模型。请关闭占用显存的程序，或改用 4-bit 量化模型。"
MSG_GENERATE = "模型生成回答时出错，请重试。"
MSG_TOO_LONG = "问题和对话历史太长，超出了模型的上下文长度。请清空对话或缩短问题后重试。"
MSG_CLOSED = "推理引擎已关闭，请重启应用。"
MSG_STALLED = "模型长时间没有响应，本次回答已中止，请重试。"
MSG_KV_SMALL = ("显存中留给对话缓存（KV cache）的空间只够约 {tokens} 个 token，少于一次对话的上限 {session_len} 个 "
                "token，模型无法启动。请调大 --cache-max-entry-count（LE_CACHE_MAX_ENTRY_COUNT）、调小 --session-len，"
                "或用 --quant-policy 8 / 4 压缩 KV cache。")

KV_BLOCK_TOKENS = 64  # TurboMind's cache_block_seq_len
ABORT_WAIT_S = 10.0  # how long closing a stream waits for TurboMind to free the slot
STALL_S = 600.0  # no output at all for this long ends the stream with an error
ABANDON_S = 30.0  # outputs left unread this long: the consumer has gone, TurboMind's request is aborted
LOAD_MARGIN_BYTES = 2 * 1024**3  # free memory wanted beyond the weights (buffers, CUDA context)
_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort",
                                            "error": "error"}
_KV_LABELS = {0: "fp16", 4: "int4", 8: "int8"}


def map_finish_reason(reason: str | None) -> FinishReason | None:
    """LMDeploy's ``finish_reason`` as ours (unknown values count as errors)."""
    if reason is None:
        return None
    mapped = _FINISH_REASONS.get(str(reason))
    if mapped is None:
        log.warning("unknown TurboMind finish_reason %r treated as an error", reason)
        return "error"
    return mapped


def generation_kwargs(params: SamplingParams, stop_ids: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments for ``lmdeploy.GenerationConfig`` from our sampling settings.

    Greedy (or temperature 0) turns sampling off; LMDeploy then decodes with top_k=1 and
    ignores temperature, top_p and repetition_penalty. ``top_k`` keeps LMDeploy's default
    (50, as in Hugging Face ``generate``). Greedy runs still get a fixed ``random_seed`` (the
    request's, else 0) so that TurboMind's sampling layer, which runs even at top_k=1, breaks
    exact ties the same way each time: two greedy runs of one prompt must give one answer.
    """
    sample = not params.greedy and params.temperature > 0
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "do_sample": sample,
        "stop_token_ids": list(stop_ids),
        "skip_special_tokens": True,
    }
    if sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p,
                      repetition_penalty=params.repetition_penalty)
        if params.seed is not None:
            kwargs["random_seed"] = params.seed
    else:
        kwargs["random_seed"] = params.seed if params.seed is not None else 0
    return kwargs


def build_generation_config(params: SamplingParams, stop_ids: Sequence[int]) -> Any:
    """An ``lmdeploy.GenerationConfig`` for one request."""
    from lmdeploy import GenerationConfig

    return GenerationConfig(**generation_kwargs(params, stop_ids))


def user_error(exc: BaseException) -> EngineError:
    """An engine-side exception as an ``EngineError`` with a fitting Chinese message."""
    if isinstance(exc, EngineError):
        return exc
    code = getattr(getattr(exc, "code", None), "value", getattr(exc, "code", None))
    message = MSG_TOO_LONG if code == "context_length_exceeded" else MSG_GENERATE
    err = EngineError(message, f"TurboMind request failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def require_turbomind() -> None:
    """Raise ``EngineError`` (not SystemExit) when TurboMind's native module cannot load here."""
    try:
        from lmdeploy import turbomind
    except Exception as exc:
        raise EngineError(MSG_UNAVAILABLE, f"lmdeploy import failed: {exc}") from exc
    if not turbomind.is_available():
        raise EngineError(MSG_UNAVAILABLE, f"TurboMind unavailable: {turbomind._import_error}")




def _validate(model_format: str, session_len: int, cache_max_entry_count: float, quant_policy: int,
              max_batch_size: int, tp: int, cache_generation: str = "all") -> None:
    """ValueError with the allowed range for a bad engine option."""
    if model_format not in ("awq", "hf", "fp8"):
        raise ValueError(f"model_format must be 'awq', 'hf' or 'fp8', got {model_format!r}")
    if cache_generation not in CACHE_GENERATION:
        raise ValueError(f"cache_generation must be one of {CACHE_GENERATION}, got {cache_generation!r}")
    if not 256 <= session_len <= 1_048_576:
        raise ValueError(f"session_len must be in [256, 1048576], got {session_len}")
    if not 0.0 < cache_max_entry_count <= 1.0:
        raise ValueError(f"cache_max_entry_count must be in (0, 1], got {cache_max_entry_count}")
    if quant_policy not in (0, 4, 8):
        raise ValueError(f"quant_policy must be 0, 4 or 8, got {quant_policy}")
    if not 1 <= max_batch_size <= 1024:
        raise ValueError(f"max_batch_size must be in [1, 1024], got {max_batch_size}")
    if not 1 <= tp <= 8:
        raise ValueError(f"tp must be in [1, 8], got {tp}")


def kv_bytes_per_token(model_dir: Path, quant_policy: int) -> int:
    """KV-cache bytes one token takes: layers x KV heads x head dim x (K, V) x element size, plus 5 %
    for the int8/int4 scales and rounding."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    elem = {0: 2.0, 8: 1.0, 4: 0.5}[quant_policy]
    return int(int(cfg["num_hidden_layers"]) * kv_heads * head_dim * 2 * elem * (1.0 if quant_policy == 0 else 1.05))


def kv_tokens(free_bytes: int, weights_bytes: int, share: float, bytes_per_token: int, tp: int = 1) -> int:
    """At most how many tokens TurboMind's KV cache will hold: ``share`` of what a GPU has left after
    its part of the weights (each GPU holds 1/tp of every token's KV). TurboMind's own buffers
    come out of that too, so the real cache is somewhat smaller."""
    left = max(0, free_bytes - weights_bytes // tp)
    return int(share * left / max(1, bytes_per_token // tp))


def check_kv_room(model_dir: Path, session_len: int, share: float, quant_policy: int, tp: int) -> None:
    """Raise ``GpuMemoryError`` when the KV cache could not hold one whole conversation.

    TurboMind then never finishes creating its engine (measured on the H200: a cache of ~1,400
    tokens for session_len 2048 hung in ``_create_engine`` for minutes), so this is decided before
    loading: refused when even the upper estimate (``kv_tokens``) is below 90 % of ``session_len``.
    The compare tab's planner gives an fp16 engine exactly session_len's worth (1 GiB, 8,192 tokens
    of a 7B model; rounded down, a few tokens less), which TurboMind served on the H200 at 23.7 GB
    free. Without NVML it checks nothing.
    """
    from legal_eagle.planner import weights_bytes

    free_total = metrics.gpu_free_total(0)
    if free_total is None:
        return
    tokens = kv_tokens(free_total[0], weights_bytes(model_dir), share, kv_bytes_per_token(model_dir, quant_policy), tp)
    if tokens < 0.9 * session_len:
        raise GpuMemoryError(MSG_KV_SMALL.format(tokens=tokens, session_len=session_len),
                             f"KV cache of about {tokens} tokens < session_len {session_len} "
                             f"(cache_max_entry_count {share}, quant_policy {quant_policy}, "
                             f"{free_total[0] / 2**30:.1f} GiB free)")


def check_free_memory(model_dir: Path, tp: int) -> None:
    """Raise ``GpuMemoryError`` when a GPU lacks room for its share of the weights.

    TurboMind aborts the whole process when it runs out of memory while loading, so this is
    decided beforehand. Without NVML it checks nothing.
    """
    from legal_eagle.planner import weights_bytes
    from legal_eagle.platform import gpu_fit_report

    need = weights_bytes(model_dir) // tp + LOAD_MARGIN_BYTES
    for index in range(tp):
        free_total = metrics.gpu_free_total(index)
        if free_total is not None and free_total[0] < need:
            finding = gpu_fit_report(free_total[0], need, what=f"该模型（{model_dir.name}）")
            raise GpuMemoryError(f"{MSG_NO_MEMORY}\n{finding.zh}", f"GPU {index}: {finding.en}")


def _quantization_label(model_dir: Path, model_format: str, dtype: str) -> str:
    """Human-readable weight format: 'AWQ W4A16 g128', 'FP8 W8A16 (128x128 blocks)' or 'fp16'/'bf16'."""
    if model_format == "fp8":
        return "FP8 W8A16 (128x128 blocks)"
    if model_format == "awq":
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        quant = config.get("quantization_config", {})
        return f"AWQ W{quant.get('bits', 4)}A16 g{quant.get('group_size', 128)}"
    return {"float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)


def hf_tokenizer_of(pipe: Any) -> Any:
    """The Hugging Face tokenizer inside an LMDeploy pipeline."""
    try:
        return pipe.async_engine.tokenizer.model.model
    except AttributeError as exc:
        raise EngineError(MSG_LOAD, "pipeline has no Hugging Face tokenizer") from exc


def _on_event_loop() -> bool:
    """Whether this thread is running an asyncio event loop right now (blocking it would stall it)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@dataclass(eq=False)
class _Run:
    """One answer in flight: its inputs, its output queue and its stop signals."""

    input_ids: list[int]
    gen_config: Any
    outputs: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None
    session: Any = None
    abort_task: asyncio.Task[None] | None = None
    released: bool = False
    release_on_done: bool = False  # the consumer has gone; the driver counts the run out when it ends
    stop_asked_at: float | None = None
    started: bool = False  # the driver was handed to the engine's loop
    last_pull: float = field(default_factory=time.monotonic)  # when the consumer last took an output


class _Answer(Iterator[Chunk]):
    """What ``TurbomindEngine.stream`` returns: the chunks of a run already handed to TurboMind.

    A generator would not do: one closed (or dropped) before its first ``next`` never runs its
    ``finally``, and the request would keep its slot until ``ABANDON_S``.
    """

    def __init__(self, engine: TurbomindEngine, run: _Run) -> None:
        self._engine, self._run = engine, run
        self._chunks = engine._relay(run)
        self._finished = False

    def __next__(self) -> Chunk:
        if self._finished:
            raise StopIteration
        try:
            return next(self._chunks)
        except BaseException:  # the end, an engine error or an interrupt: the run is over for us
            self.close()
            raise

    def close(self) -> None:
        """Abort the run if it still runs and count it out (once)."""
        if self._finished:
            return
        self._finished = True
        self._chunks.close()
        self._engine._finish(self._run)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class TurbomindEngine:
    """Streams answers from an LMDeploy TurboMind pipeline (``lmdeploy.pipeline``)."""

    def __init__(self, pipe: Any, info: EngineInfo, *, tokenizer: Any | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, baseline_gpu_used: int | None = None) -> None:
        """Wrap a ready pipeline (tests inject a fake one).

        Args:
            pipe: an ``lmdeploy.Pipeline`` (uses ``async_engine``, ``internal_thread.loop``, ``close``).
            info: the description shown in the UI.
            tokenizer: Hugging Face tokenizer for prompts; default: the pipeline's own.
            loop: the event loop that drives the engine; default: the pipeline's.
            baseline_gpu_used: GPU memory in use before loading, for the memory fallback.
        """
        self._pipe = pipe
        self._info = info
        self._tokenizer = tokenizer if tokenizer is not None else hf_tokenizer_of(pipe)
        self._stop_ids = stop_token_ids(self._tokenizer)
        self._loop = loop if loop is not None else pipe.internal_thread.loop
        self._baseline_gpu_used = baseline_gpu_used
        self._lock = threading.Lock()
        self._active = 0
        self._runs: set[_Run] = set()
        self._closed = False

    @classmethod
    def load(cls, model_dir: Path, *, model_format: Literal["awq", "hf", "fp8"], session_len: int,
             cache_max_entry_count: float, quant_policy: Literal[0, 4, 8], max_batch_size: int, tp: int,
             enable_prefix_caching: bool = True, cache_generation: str = "all", name: str = "turbomind",
             log_level: str = "WARNING", check_memory: bool = True,
             extra_options: Mapping[str, Any] | None = None, lean_memory: bool = True,
             gemm_tuning_dir: Path | None = None) -> TurbomindEngine:
        """Load a checkpoint into TurboMind in this process.

        Args:
            model_dir: folder with config.json, safetensors weights and tokenizer.
            model_format: "hf" (fp16/bf16 weights), "awq" (4-bit, quantization_config in config.json)
                or "fp8" (blocked FP8 weights; a benchmark experiment, not an app setting).
            session_len: context window in tokens (prompt + answer).
            cache_max_entry_count: share of the GPU memory left free after the weights that the
                KV cache takes, in (0, 1].
            quant_policy: KV-cache precision: 0 (fp16), 8 (int8) or 4 (int4).
            max_batch_size: answers generated at once; more wait for a free slot.
            tp: tensor-parallel GPUs.
            enable_prefix_caching: reuse the KV cache of a shared prompt prefix (multi-turn chats).
            cache_generation: which generated blocks the prefix cache indexes: "all" (also the last,
                partly filled block: the next turn re-reads only its new question), "auto" (whole
                blocks only, LMDeploy's default) or "none".
            name: label shown in the UI.
            log_level: LMDeploy's log level.
            check_memory: refuse to load (GpuMemoryError) when NVML shows too little free memory
                for the weights, or for a KV cache of one whole ``session_len``.
            extra_options: more ``TurbomindEngineConfig`` fields (benchmark experiments, e.g.
                ``gemm_input_dtype``); an unknown name is a ValueError.
            lean_memory: hand back GPU memory TurboMind holds unused (``gpu_memory``: a 512-byte CUDA
                stack limit before the load, the default pool trimmed after it); best effort, and
                what was done is in ``info.extra``.
            gemm_tuning_dir: where TurboMind's GEMM tuning is kept per GPU, LMDeploy, checkpoint and
                options (``gemm_tuning``): the first load tunes and writes it, later ones read it
                and skip the warm-up; None tunes on every load.

        Returns:
            The ready engine.

        Raises:
            ValueError: an option is out of range.
            EngineError: TurboMind is unavailable here, the model is missing or unsupported, or
                loading failed (GpuMemoryError when free GPU memory is too small).
        """
        _validate(model_format, session_len, cache_max_entry_count, quant_policy, max_batch_size, tp,
                  cache_generation)
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise EngineError(MSG_MISSING, f"no config.json in {model_dir}")
        require_turbomind()
        from lmdeploy.turbomind.supported_models import is_supported

        if not is_supported(str(model_dir)):
            raise EngineError(MSG_UNSUPPORTED, f"TurboMind does not support {model_dir}")
        if check_memory:
            check_free_memory(model_dir, tp)
            check_kv_room(model_dir, session_len, cache_max_entry_count, quant_policy, tp)
        from lmdeploy import TurbomindEngineConfig, pipeline

        options: dict[str, Any] = {"model_format": model_format, "session_len": session_len,
                                   "cache_max_entry_count": cache_max_entry_count, "quant_policy": quant_policy,
                                   "max_batch_size": max_batch_size, "tp": tp,
                                   "enable_prefix_caching": enable_prefix_caching}
        if enable_prefix_caching:  # LMDeploy requires prefix caching for cache_generation
            options["cache_generation"] = cache_generation
        unknown = set(extra_options or {}) - {f.name for f in dataclasses.fields(TurbomindEngineConfig)}
        if unknown:  # TurbomindEngineConfig would drop them without a word
            raise ValueError(f"TurbomindEngineConfig has no option {sorted(unknown)}")
        options.update(extra_options or {})
        try:
            config = TurbomindEngineConfig(**options)
        except (TypeError, ValueError, AssertionError) as exc:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"bad TurboMind option in {sorted(extra_options or {})}: {exc}") from exc
        baseline = metrics.gpu_used_total()
        stack = gpu_memory.set_stack_limit() if lean_memory else None
        start = time.perf_counter()
        try:
            with gemm_tuning.tuning_for_load(gemm_tuning_dir, model_dir, {**options, "model_format": model_format}
                                             ) as tuning:
                pipe = pipeline(str(model_dir), backend_config=config, log_level=log_level)
        except SystemExit as exc:  # LMDeploy ends the process on some load failures
            raise EngineError(MSG_LOAD, f"lmdeploy.pipeline raised SystemExit({exc.code})") from exc
        except Exception as exc:
            raise EngineError(MSG_LOAD, f"lmdeploy.pipeline({model_dir}) failed: {exc!r}") from exc
        load_s = time.perf_counter() - start
        trimmed = gpu_memory.trim_default_pool() if lean_memory else False
        if getattr(pipe.async_engine, "backend", "turbomind") != "turbomind":
            pipe.close()
            raise EngineError(MSG_UNSUPPORTED, "LMDeploy fell back to its PyTorch engine")
        backend = pipe.async_engine.backend_config
        dtype = str(getattr(backend, "dtype", "float16"))
        info = EngineInfo(
            name=name, backend="turbomind", model_path=str(model_dir), model_format=model_format,
            quantization=_quantization_label(model_dir, model_format, dtype), context_len=session_len,
            extra={"kv_cache": _KV_LABELS[int(quant_policy)], "cache_max_entry_count": cache_max_entry_count,
                   "max_batch_size": max_batch_size, "tp": tp, "enable_prefix_caching": enable_prefix_caching,
                   "cache_generation": options.get("cache_generation", "none"), **dict(extra_options or {}),
                   "devices": list(getattr(backend, "devices", None) or range(tp)), "dtype": dtype,
                   "load_s": round(load_s, 2), "cuda_stack_limit": stack, "trimmed_default_pool": trimmed,
                   "gemm_tuning": tuning.describe(), "gemm_tuning_file": str(tuning.path) if tuning.path else None},
        )
        engine = cls(pipe, info, baseline_gpu_used=baseline)
        log.info("TurboMind ready in %.1f s: %s (%s, KV %s, session_len %d, GPU memory %s)", load_s,
                 model_dir, info.quantization, info.extra["kv_cache"], session_len,
                 metrics.format_bytes(engine.gpu_memory_bytes()))
        return engine

    @property
    def info(self) -> EngineInfo:
        """What is loaded and how."""
        return self._info

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Exact prompt length with the chat template."""
        return len(render_ids(self._tokenizer, messages))

    def stream(self, messages: Sequence[Message], params: SamplingParams) -> Iterator[Chunk]:
        """Stream an answer. The request goes to TurboMind now, before the first chunk is asked for
        (the prefill then overlaps whatever the caller does first, such as the page's first update);
        closing the stream, or dropping it unread, aborts it in TurboMind and frees its slot."""
        if self._closed:
            raise EngineError(MSG_CLOSED, "stream() after close()")
        ids = render_ids(self._tokenizer, messages)
        if len(ids) >= self._info.context_len:
            raise EngineError(MSG_TOO_LONG, f"prompt of {len(ids)} tokens >= {self._info.context_len}")
        run = _Run(input_ids=ids, gen_config=build_generation_config(params, self._stop_ids))
        self._start(run)
        return _Answer(self, run)

    def _start(self, run: _Run) -> None:
        """Count the run in and hand its driver to the engine's loop."""
        with self._lock:
            if self._closed:
                raise EngineError(MSG_CLOSED, "stream() after close()")
            self._active += 1
            self._runs.add(run)
        coro = self._drive(run)
        try:
            asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError as exc:  # the pipeline's loop is gone
            coro.close()
            run.done.set()
            self._release(run)
            raise EngineError(MSG_CLOSED, f"engine loop unavailable: {exc}") from exc
        run.started = True

    def _finish(self, run: _Run) -> None:
        """The consumer is done with a run (read to the end, failed, closed or dropped): abort it in
        TurboMind if it still runs, and count it out now or when its driver ends."""
        alive = False
        if not run.done.is_set() and run.started:
            # Gradio closes a cancelled handler on its event loop thread: waiting there for
            # TurboMind to confirm would freeze every other user's stream meanwhile.
            alive = self._abort(run, wait=not _on_event_loop())  # done or not: checked under the lock
        self._release_when_done(run, driver_alive=alive)

    def _relay(self, run: _Run) -> Generator[Chunk, None, None]:
        """Turn queued outputs into chunks; the last chunk comes once the slot is free.

        Outputs that queued up while the consumer was busy come as one chunk (their texts joined):
        under load the app's handlers then take a few chunks per update instead of one per token.
        """
        n_tokens, final = 0, None
        while True:
            text, count, ended = "", n_tokens, False
            for kind, payload in self._take(run):
                if kind == "end":
                    ended = True
                    break
                reason = None if kind == "error" else map_finish_reason(payload.finish_reason)
                if kind == "error" or reason == "error":
                    if text:  # what came before the failure still reaches the caller
                        yield Chunk(text=text, n_tokens=count)
                    if kind == "error":
                        raise user_error(payload)
                    raise EngineError(MSG_GENERATE, "TurboMind finished with finish_reason 'error'")
                text += payload.response or ""
                count = max(count, int(payload.generate_token_len or 0))
                if reason is not None:
                    final = Chunk(text=text, n_tokens=count, finish_reason=reason)
                    text = ""
            if text or (count > n_tokens and final is None):
                yield Chunk(text=text, n_tokens=count)
            n_tokens = count
            if ended:
                break
        self._release(run)  # the driver has ended: the slot is free before the caller sees the end
        yield final or Chunk(text="", n_tokens=n_tokens, finish_reason="abort")

    @staticmethod
    def _take(run: _Run) -> list[tuple[str, Any]]:
        """The next output (waiting up to ``STALL_S``) and all that queued behind it."""
        run.last_pull = time.monotonic()
        try:
            items = [run.outputs.get(timeout=STALL_S)]
        except queue.Empty:
            raise EngineError(MSG_STALLED, f"no TurboMind output for {STALL_S:.0f} s") from None
        while True:
            try:
                items.append(run.outputs.get_nowait())
            except queue.Empty:
                break
        run.last_pull = time.monotonic()
        return items

    async def _drive(self, run: _Run) -> None:
        """On the engine's loop: preprocess the ids, generate, and queue every output."""
        run.task = asyncio.current_task()
        engine = self._pipe.async_engine
        session = None
        try:
            if run.stop.is_set():
                return
            session = run.session = engine.session_mgr.get()
            request = await engine.preprocess(None, session, gen_config=run.gen_config,
                                              input_ids=run.input_ids)
            async with contextlib.aclosing(engine.generate(request, stream_response=True)) as outputs:
                async for out in outputs:
                    run.outputs.put(("out", out))
                    if out.finish_reason is None and (run.stop.is_set() or self._abandoned(run)):
                        break  # closing generate() cancels the request in TurboMind (safe_run)
        except asyncio.CancelledError:
            log.debug("TurboMind generation cancelled")
        except Exception as exc:
            run.outputs.put(("error", exc))
        finally:
            if session is not None:
                with contextlib.suppress(Exception):
                    engine.session_mgr.remove(session)
            with self._lock:  # a consumer that left without waiting is counted out now
                run.done.set()
                if run.release_on_done:
                    self._release_locked(run)
            run.outputs.put(("end", None))
            if run.stop.is_set() and run.stop_asked_at is not None:
                took = time.monotonic() - run.stop_asked_at
                (log.warning if took > 1.0 else log.debug)("TurboMind let go of a stopped answer after %.2f s", took)

    def _abandoned(self, run: _Run) -> bool:
        """Whether a run's consumer left its outputs unread for ``ABANDON_S`` (it is then stopped and
        counted out when its driver ends).

        Gradio does not always close a cancelled handler: on the GPU machine, after gradio_client's
        ``job.cancel()``, the chat handler stayed suspended at a ``yield`` (docs/reliability.md), and
        its request would have held a TurboMind slot and KV blocks until it reached max_new_tokens.
        """
        if run.outputs.qsize() < 2 or time.monotonic() - run.last_pull < ABANDON_S:
            return False
        log.warning("no one read a TurboMind answer for %.0f s: aborting it", time.monotonic() - run.last_pull)
        self._mark_stopped(run)
        with self._lock:
            run.release_on_done = True
        return True

    def _abort(self, run: _Run, wait: bool = True) -> bool:
        """Stop a run; with ``wait``, also wait (bounded) until TurboMind has let go of it.

        Returns:
            False when the engine's loop is gone (the run's driver will never end).
        """
        if not self._signal_stop(run):
            return False
        if wait:
            self._wait_stopped(run)
        return True

    @staticmethod
    def _mark_stopped(run: _Run) -> None:
        """Set a run's stop flag, noting when it was first asked (for the let-go log line)."""
        if run.stop_asked_at is None:
            run.stop_asked_at = time.monotonic()
        run.stop.set()

    def _signal_stop(self, run: _Run) -> bool:
        """Ask a run to stop; False when the engine's loop is gone (nothing runs any more)."""
        self._mark_stopped(run)
        try:
            self._loop.call_soon_threadsafe(self._stop_on_loop, run)
        except RuntimeError:
            return False
        return True

    @staticmethod
    def _wait_stopped(run: _Run) -> None:
        """Wait (bounded) for a stopped run's driver to end."""
        if not run.done.wait(ABORT_WAIT_S):
            log.warning("TurboMind did not confirm an abort within %.0f s", ABORT_WAIT_S)

    @staticmethod
    def _stop_on_loop(run: _Run) -> None:
        """On the engine's loop: end the run the way LMDeploy itself does.

        While the request holds an engine slot, ``Session.async_abort`` asks TurboMind to cancel
        it, and the stream then ends with finish_reason 'abort' (no task cancellation inside
        LMDeploy's cleanup code). While it still waits for a slot (or has not started), the
        task is cancelled instead.
        """
        session = run.session
        if session is not None and getattr(session, "_handle", None) is not None:
            run.abort_task = asyncio.get_running_loop().create_task(session.async_abort())
        elif run.task is not None and not run.task.done():
            run.task.cancel()

    def _release(self, run: _Run) -> None:
        """Count a run as finished (once)."""
        with self._lock:
            self._release_locked(run)

    def _release_locked(self, run: _Run) -> None:
        if not run.released:
            run.released = True
            self._active -= 1
            self._runs.discard(run)

    def _release_when_done(self, run: _Run, driver_alive: bool) -> None:
        """Count a run as finished now, or (``driver_alive``: TurboMind still holds it) when its driver ends."""
        with self._lock:
            if run.done.is_set() or not driver_alive:
                self._release_locked(run)
            else:
                run.release_on_done = True

    def active_generations(self) -> int:
        """Streams started and not yet finished or closed."""
        with self._lock:
            return self._active

    def gpu_memory_bytes(self) -> int | None:
        """GPU memory this process holds (NVML), else the growth since before loading, else None."""
        if self._closed:
            return None
        used = metrics.gpu_memory_used_by_process()
        if used is not None:
            return used
        if self._baseline_gpu_used is not None:
            now = metrics.gpu_used_total()
            if now is not None:
                return max(0, now - self._baseline_gpu_used)
        return None

    def close(self) -> None:
        """Abort running answers and shut the pipeline down."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            runs = list(self._runs)
        signalled = [run for run in runs if self._signal_stop(run)]  # all at once: none takes a freed slot
        for run in signalled:
            self._wait_stopped(run)
        pipe, self._pipe = self._pipe, None  # a reference left to this engine must not pin the weights
        try:
            pipe.close()
        except Exception as exc:
            log.warning("closing the TurboMind pipeline failed: %s", exc)
