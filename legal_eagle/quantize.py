"""First-start AWQ (W4A16, group 128) with a file lock, atomic publish, manifest and a sanity check.

Layout beside the target ``OUT``: ``.OUT.lock`` (fcntl lock: one process quantizes, the others
wait), ``.OUT.tmp-*`` (work in progress), ``OUT`` (published by one rename, the manifest
written last inside it). A directory without a matching ``quant_manifest.json`` is never
served: a killed run leaves only a temp dir, which the next start removes and redoes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from legal_eagle.calibration import CalibrationSpec, build_samples
from legal_eagle.errors import QuantizationError
from legal_eagle.sanity import SanityCheck, dequant_agreement_check, sanity_prompts
from legal_eagle.weights import checkpoint_problems, fingerprint

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, "float | None", str], None]
Quantizer = Callable[[Path, Path, int, int, Sequence[Any]], None]
MANIFEST = "quant_manifest.json"
FORMAT_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "generation_config.json")
_DROPPED_FILES = ("inputs_stats.pth", "outputs_stats.pth", "chat_template.jinja")


@dataclass(frozen=True)
class QuantRequest:
    """What to quantize and how; two requests with equal ``key()`` may share a result."""

    source_dir: Path
    bits: int = 4
    group_size: int = 128
    calib: CalibrationSpec = CalibrationSpec()
    source_id: str | None = None
    revision: str | None = None
    min_agreement: float = 0.85

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ValueError(f"only 4-bit AWQ is supported (TurboMind W4A16), got bits={self.bits}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128, got {self.group_size}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in 0..1, got {self.min_agreement}")

    def key(self) -> dict[str, Any]:
        """The fields a published result must match to be reused."""
        return {"format_version": FORMAT_VERSION, "source_fingerprint": fingerprint(self.source_dir),
                "bits": self.bits, "group_size": self.group_size, "calibration": self.calib.describe()}


def _noop(stage: str, fraction: float | None, detail: str) -> None:
    """Progress sink that drops everything."""


@contextlib.contextmanager
def file_lock(lock_path: Path, *, timeout: float, on_progress: ProgressFn = _noop,
              what: str = "量化") -> Iterator[None]:
    """Hold an exclusive fcntl lock on ``lock_path``; wait up to ``timeout`` seconds for it.

    Raises:
        QuantizationError: the lock was not free within ``timeout``.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > timeout:
                    raise QuantizationError(
                        f"另一个进程正在{what}模型，已等待 {waited:.0f} 秒仍未完成。"
                        f"请稍后再启动，或确认没有其他进程后删除锁文件 {lock_path}。",
                        f"lock {lock_path} busy after {waited:.0f}s") from None
                if not told:
                    logger.info("waiting for another process to finish (%s, lock %s)", what, lock_path)
                    told = True
                on_progress("wait", None, f"另一个进程正在{what}模型，等待中（已等待 {waited:.0f} 秒）")
                time.sleep(min(1.0, max(0.05, timeout / 20)))
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The published manifest, or None when absent or unreadable."""
    try:
        return dict(json.loads((out_dir / MANIFEST).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def reusable(out_dir: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest when ``out_dir`` is a complete result for exactly this request, else None."""
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.get("request") != key or checkpoint_problems(out_dir):
        return None
    return manifest


def lmdeploy_awq(src: Path, work_dir: Path, bits: int, group_size: int, samples: Sequence[Any]) -> None:
    """Run ``lmdeploy.lite`` AWQ on ``src`` into ``work_dir`` with our own calibration samples."""
    import torch
    from lmdeploy.lite.apis import calibrate as lite_calibrate
    from lmdeploy.lite.apis.auto_awq import auto_awq

    device = "cuda" if torch.cuda.is_available() else "cpu"
    original = lite_calibrate.get_calib_loaders
    lite_calibrate.get_calib_loaders = lambda *a, **k: list(samples)  # no hub data sets offline
    try:
        seqlen = int(samples[0].shape[1]) if samples else 2048
        auto_awq(str(src), work_dir=str(work_dir), calib_samples=len(samples), calib_seqlen=seqlen,
                 w_bits=bits, w_group_size=group_size, device=device, dtype="float16")
    finally:
        lite_calibrate.get_calib_loaders = original


def _finish_files(src: Path, work: Path) -> None:
    """Drop calibration stats; make the tokenizer files exactly the source's."""
    for name in _DROPPED_FILES:
        (work / name).unlink(missing_ok=True)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, work / name)


def _publish(work: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``work`` with renames (the old one, if any, is moved aside first)."""
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / out_dir.name)
        os.replace(work, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(work, out_dir)


def _clean_leftovers(out_dir: Path) -> None:
    """Remove temp dirs of killed runs (only called while holding the lock)."""
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for left in out_dir.parent.glob(pattern):
            logger.warning("removing leftover %s of an interrupted run", left)
            shutil.rmtree(left, ignore_errors=True)


def quantize_model(
    request: QuantRequest,
    out_dir: Path,
    *,
    on_progress: ProgressFn | None = None,
    quantizer: Quantizer | None = None,
    sanity_check: SanityCheck | None = None,
    lock_timeout: float = 4 * 3600.0,
) -> tuple[Path, dict[str, Any]]:
    """The AWQ 4-bit checkpoint for ``request`` at ``out_dir``: reused when its manifest matches, else made.

    Args:
        request: source fp16 Llama dir, bits, group size, calibration, sanity threshold.
        out_dir: where the result is published.
        on_progress: ``(stage, fraction or None, detail)``; stages "wait", "quantize", "check".
        quantizer: ``(src, work_dir, bits, group_size, samples)``; default: lmdeploy's auto_awq.
        sanity_check: ``(fp16_dir, awq_dir, prompts, threshold) -> SanityResult``; default:
            dequantized-weights top-1 agreement in transformers (CPU, or CUDA when present).
        lock_timeout: seconds to wait for another process that is quantizing the same target.

    Returns:
        (out_dir, manifest).

    Raises:
        QuantizationError: quantization or the sanity check failed; nothing was published.
    """
    progress = on_progress or _noop
    out_dir = Path(out_dir)
    key = request.key()
    manifest = reusable(out_dir, key)
    if manifest:
        logger.info("reusing AWQ checkpoint %s", out_dir)
        return out_dir, manifest
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir.parent / f".{out_dir.name}.lock", timeout=lock_timeout, on_progress=progress):
        manifest = reusable(out_dir, key)  # another process may have finished while we waited
        if manifest:
            return out_dir, manifest
        _clean_leftovers(out_dir)
        return out_dir, _quantize_locked(request, key, out_dir, progress, quantizer or lmdeploy_awq,
                                         sanity_check or dequant_agreement_check)


def _quantize_locked(request: QuantRequest, key: dict[str, Any], out_dir: Path, progress: ProgressFn,
                     quantizer: Quantizer, sanity_check: SanityCheck) -> dict[str, Any]:
    """Quantize into a temp dir, check, write the manifest, publish; the lock is held."""
    from transformers import AutoTokenizer

    start = time.monotonic()
    src = Path(request.source_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    try:
        samples = build_samples(tokenizer, request.calib)
    except (OSError, ValueError) as exc:
        raise QuantizationError(f"读取量化校准数据失败：{exc}", repr(exc)) from exc
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        progress("quantize", None, f"首次启动：正在进行 AWQ 4 比特量化（{len(samples)} 段校准文本），请稍候……")
        logger.info("AWQ W%dA16 g%d of %s with %d x %d calibration tokens (%s)", request.bits,
                    request.group_size, src, len(samples), request.calib.seqlen, request.calib.source)
        try:
            quantizer(src, work, request.bits, request.group_size, samples)
        except Exception as exc:
            raise QuantizationError(f"AWQ 量化失败：{exc}", repr(exc)) from exc
        _finish_files(src, work)
        problems = checkpoint_problems(work)
        if problems:
            raise QuantizationError("AWQ 量化结果不完整，未发布。", f"{work}: {problems}")
        quant_s = time.monotonic() - start
        progress("check", None, f"量化完成（{quant_s:.0f} 秒），正在检查 4 比特模型与原模型的一致性……")
        try:
            result = sanity_check(src, work, sanity_prompts(tokenizer), request.min_agreement)
        except Exception as exc:
            raise QuantizationError(f"量化结果检查失败：{exc}", repr(exc)) from exc
        logger.info("AWQ sanity check: top-1 agreement %.3f over %d positions (threshold %.2f, %s)",
                    result.agreement, result.positions, result.threshold, result.method)
        if not result.passed:
            raise QuantizationError(
                f"4 比特模型与原模型的下一词一致率只有 {result.agreement:.0%}（要求至少 {result.threshold:.0%}），"
                "量化结果未发布。可改用 fp16（hf）格式运行。", f"sanity {result}")
        manifest = _manifest(request, key, samples, result.as_dict(), quant_s, time.monotonic() - start)
        (work / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2))
        _publish(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress("quantize", 1.0, f"4 比特模型已就绪（用时 {time.monotonic() - start:.0f} 秒）")
    return manifest


def _manifest(request: QuantRequest, key: dict[str, Any], samples: Sequence[Any], sanity: dict[str, Any],
              quant_s: float, total_s: float) -> dict[str, Any]:
    """The manifest written last into the result."""
    import lmdeploy

    return {
        "request": key,
        "source": {"path": str(Path(request.source_dir).resolve()), "model_id": request.source_id,
                   "revision": request.revision},
        "quantization": {"method": "awq", "bits": request.bits, "group_size": request.group_size,
                         "calibration_samples": len(samples), "calibration_seqlen": request.calib.seqlen},
        "lmdeploy_version": lmdeploy.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": {"quantize": round(quant_s, 1), "total": round(total_s, 1)},
        "sanity_check": sanity,
    }
