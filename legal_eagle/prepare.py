"""One call for the app: find or download the checkpoint, convert it to Llama, quantize it once.

    source ─▶ weights.resolve_model ─▶ convert (InternLM2 → Llama, cached) ─▶ quantize (AWQ, cached)
                                                                      └──▶ FP8 blocks (--model-format fp8, cached)

Derived checkpoints live under ``cache_dir``, named after the source and a hash of it, each
written into a temp dir and renamed into place under a file lock, so several processes
starting at once do the work once and a killed start never leaves a half model behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from legal_eagle.calibration import CalibrationSpec
from legal_eagle.convert import CONVERSION_MARKER, convert_checkpoint, model_arch, read_config
from legal_eagle.errors import ModelPreparationError
from legal_eagle.fp8 import FP8_MARKER, capability_problem, cuda_capability, write_fp8_checkpoint
from legal_eagle.quantize import ProgressFn, Quantizer, QuantRequest, file_lock, quantize_model
from legal_eagle.sanity import SanityCheck
from legal_eagle.weights import Downloader, Probe, checkpoint_problems, fingerprint, resolve_model

logger = logging.getLogger(__name__)

ModelFormat = Literal["awq", "hf", "fp8"]
Fp8Writer = Callable[..., dict[str, Any]]  # (src, out, marker=...) -> what was written


@dataclass(frozen=True)
class PreparedModel:
    """What the engine loads.

    Attributes:
        path_for_engine: the directory to hand to TurboMind (4-bit for "awq", fp16 for "hf", 8-bit for "fp8").
        fp16_path: the fp16 Llama-layout checkpoint (for the transformers engine or a comparison).
        model_format: "awq", "hf" or "fp8", as TurboMindEngineConfig(model_format=...) wants it.
        manifest: the quantization manifest ({} for "hf" or a checkpoint that came quantized; the
            FP8 copy's marker for "fp8").
        source_path: the downloaded or given checkpoint directory.
    """

    path_for_engine: Path
    fp16_path: Path
    model_format: ModelFormat
    manifest: dict[str, Any] = field(default_factory=dict)
    source_path: Path | None = None

    @property
    def path(self) -> Path:
        """Alias of ``path_for_engine``."""
        return self.path_for_engine


def _log_progress(stage: str, fraction: float | None, detail: str) -> None:
    """Default progress sink: the log."""
    logger.info("[%s%s] %s", stage, "" if fraction is None else f" {fraction:.0%}", detail)


def _slug(src: Path) -> str:
    """A readable, collision-safe cache name for a source directory."""
    path = src.resolve()
    # modelscope snapshots live in .../owner--name/snapshots/<revision>/: name them after the repo
    name = path.parent.parent.name if path.parent.name == "snapshots" else path.name
    name = re.sub(r"[^\w.-]+", "_", name) or "model"
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def is_awq_checkpoint(model_dir: Path) -> bool:
    """True when config.json says the weights are already AWQ-quantized."""
    qcfg = read_config(model_dir).get("quantization_config") or {}
    return str(qcfg.get("quant_method", "")).lower() == "awq"


def llama_checkpoint(src: Path, cache_dir: Path, on_progress: ProgressFn, lock_timeout: float) -> Path:
    """``src`` itself when it is Llama already, else its cached (or fresh) Llama conversion."""
    arch = model_arch(src)
    if arch == "llama":
        return src
    if arch != "internlm2":
        raise ModelPreparationError(f"不支持的模型结构 {arch}：本程序只支持 InternLM2 和 Llama 结构的模型。",
                                    f"unsupported architecture {arch} in {src}")
    dst = cache_dir / f"{_slug(src)}-llama"
    want = fingerprint(src)

    def ready() -> bool:
        try:
            marker = json.loads((dst / CONVERSION_MARKER).read_text())
        except (OSError, ValueError):
            return False
        return marker.get("source_fingerprint") == want and not checkpoint_problems(dst)

    if ready():
        return dst
    with file_lock(cache_dir / f".{dst.name}.lock", timeout=lock_timeout, on_progress=on_progress, what="转换"):
        if ready():
            return dst
        for left in cache_dir.glob(f".{dst.name}.tmp-*"):  # a killed conversion's leftovers
            shutil.rmtree(left, ignore_errors=True)
        start = time.monotonic()
        on_progress("convert", 0.0, "首次启动：把 InternLM2 权重转换为 Llama 格式……")
        try:
            convert_checkpoint(src, dst, on_progress=on_progress, marker={"source_fingerprint": want})
        except (OSError, ValueError) as exc:
            raise ModelPreparationError(f"转换模型格式失败：{exc}", repr(exc)) from exc
        logger.info("converted %s in %.1fs", src, time.monotonic() - start)
    return dst


def fp8_checkpoint(fp16: Path, cache_dir: Path, on_progress: ProgressFn, lock_timeout: float,
                   writer: Fp8Writer = write_fp8_checkpoint) -> tuple[Path, dict[str, Any]]:
    """The cached (or fresh) blocked-FP8 copy of the Llama-layout ``fp16`` checkpoint, and its marker."""
    dst = cache_dir / f"{_slug(fp16)}-fp8"
    want = fingerprint(fp16)

    def ready() -> dict[str, Any] | None:
        try:
            marker = json.loads((dst / FP8_MARKER).read_text())
        except (OSError, ValueError):
            return None
        return marker if marker.get("source_fingerprint") == want and not checkpoint_problems(dst) else None

    if (marker := ready()) is not None:
        return dst, marker
    with file_lock(cache_dir / f".{dst.name}.lock", timeout=lock_timeout, on_progress=on_progress, what="FP8 转换"):
        if (marker := ready()) is not None:
            return dst, marker
        for left in cache_dir.glob(f".{dst.name}.tmp-*"):  # a killed run's leftovers
            shutil.rmtree(left, ignore_errors=True)
        start = time.monotonic()
        on_progress("quantize", None, "首次启动：把 fp16 权重按 128×128 分块转换为 FP8（8 比特）……")
        try:
            writer(fp16, dst, marker={"source_fingerprint": want})
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelPreparationError(f"转换为 FP8 权重失败：{exc}", repr(exc)) from exc
        logger.info("wrote FP8 weights of %s in %.1fs", fp16, time.monotonic() - start)
    marker = ready()
    if marker is None:
        raise ModelPreparationError("FP8 权重写入后检查未通过，请删除缓存目录后重启。", f"{dst} incomplete")
    return dst, marker


def prepare_model(
    source: str,
    *,
    cache_dir: Path,
    model_format: ModelFormat = "awq",
    revision: str | None = None,
    download_dir: Path | None = None,
    calib: CalibrationSpec | None = None,
    min_agreement: float = 0.85,
    on_progress: ProgressFn | None = None,
    downloader: Downloader | None = None,
    probe: Probe | None = None,
    quantizer: Quantizer | None = None,
    sanity_check: SanityCheck | None = None,
    lock_timeout: float = 4 * 3600.0,
    fp8_writer: Fp8Writer = write_fp8_checkpoint,
    gpu_capability: Callable[[], tuple[tuple[int, int] | None, str]] = cuda_capability,
) -> PreparedModel:
    """Make ``source`` ready for an engine (download, conversion and quantization are each done once).

    Args:
        source: a local checkpoint directory or a ModelScope model id.
        cache_dir: where converted and quantized checkpoints are kept.
        model_format: "awq" (4-bit, quantized on first start), "hf" (fp16) or "fp8" (8-bit FP8
            blocks, written on first start; needs a GPU of compute capability 8.9 or more).
        revision: ModelScope revision.
        download_dir: ModelScope cache; None lets modelscope choose (it honours MODELSCOPE_CACHE).
        calib: AWQ calibration data; default: the shipped Chinese legal Q&A.
        min_agreement: sanity threshold (fp16 vs 4-bit top-1 next-token agreement).
        on_progress: ``(stage, fraction or None, detail)``; stages: download, wait, convert, quantize, check.
        downloader, probe: injected into ``weights.resolve_model`` (tests pass fakes).
        quantizer, sanity_check: injected into ``quantize.quantize_model``.
        lock_timeout: seconds to wait for another process doing the same conversion or quantization.
        fp8_writer, gpu_capability: how "fp8" writes its copy and reads the GPU (tests pass fakes).

    Returns:
        The directories to load and, for "awq", the quantization manifest.

    Raises:
        OfflineError, ModelPreparationError, QuantizationError: with a Chinese ``user_message``.
    """
    if model_format not in ("awq", "hf", "fp8"):
        raise ValueError(f"model_format must be 'awq', 'hf' or 'fp8', not {model_format!r}")
    if model_format == "fp8" and (problem := capability_problem(*gpu_capability())) is not None:
        raise ModelPreparationError(problem, "FP8 weights need compute capability 8.9+")  # before any download
    progress = on_progress or _log_progress
    cache_dir = Path(cache_dir).expanduser()
    src = resolve_model(source, revision=revision, cache_dir=download_dir, on_progress=progress,
                        downloader=downloader, probe=probe)
    if is_awq_checkpoint(src):
        if model_format != "awq":
            raise ModelPreparationError(f"给定的模型已经是 AWQ 4 比特格式，不能以 {model_format} 格式运行。",
                                        f"{src} is AWQ but model_format={model_format}")
        return PreparedModel(src, src, "awq", {}, src)
    fp16 = llama_checkpoint(src, cache_dir, progress, lock_timeout)
    if model_format == "hf":
        return PreparedModel(fp16, fp16, "hf", {}, src)
    if model_format == "fp8":
        path, marker = fp8_checkpoint(fp16, cache_dir, progress, lock_timeout, fp8_writer)
        return PreparedModel(path, fp16, "fp8", marker, src)
    request = QuantRequest(fp16, calib=calib or CalibrationSpec(), min_agreement=min_agreement,
                           source_id=None if Path(source).expanduser().is_dir() else source, revision=revision)
    out = cache_dir / f"{_slug(src)}-awq-w{request.bits}g{request.group_size}"
    path, manifest = quantize_model(request, out, on_progress=progress, quantizer=quantizer,
                                    sanity_check=sanity_check, lock_timeout=lock_timeout)
    return PreparedModel(path, fp16, "awq", manifest, src)
