"""Start-up parts: a random 7B-shaped checkpoint, AWQ weights, cold start and warm start.

Cold start follows the app's first start on a machine with the fp16 weights already on disk
(downloading is not timed): InternLM2 -> Llama conversion, ``quantize.quantize_model`` (the
app's AWQ with its calibration text and sanity check), TurboMind load, first token of a first
answer. Warm start is a new process loading the published 4-bit weights up to a first token.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SHAPE_7B = {
    "hidden_size": 4096,
    "num_layers": 32,
    "num_heads": 32,
    "num_kv_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 92544,
}


def part_make_random(args: Mapping[str, Any]) -> dict[str, Any]:
    """Random weights in InternLM2-chat-7B's shape and format (kept when already there)."""
    out = Path(args["dir"])
    if (out / "config.json").is_file():
        return {"dir": str(out), "made": False, "seconds": 0.0}
    from legal_eagle.tiny_model import build_tiny_checkpoint

    start = time.perf_counter()
    build_tiny_checkpoint(out, arch="internlm2", device="cuda", **SHAPE_7B)  # type: ignore[arg-type]
    return {"dir": str(out), "made": True, "seconds": time.perf_counter() - start}


def is_internlm2(model_dir: Path) -> bool:
    """True for an InternLM2-format checkpoint (the app converts those to Llama before AWQ)."""
    from legal_eagle.convert import model_arch

    return model_arch(model_dir) == "internlm2"


def llama_source(model_dir: Path, work_dir: Path, *, force: bool) -> tuple[Path, float]:
    """The Llama-format fp16 checkpoint AWQ starts from (converted into ``work_dir/llama`` if needed)."""
    if not is_internlm2(model_dir):
        return model_dir, 0.0
    from legal_eagle.convert import CONVERSION_MARKER, convert_checkpoint

    dst = work_dir / "llama"
    marker = dst / CONVERSION_MARKER
    same = marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("source") == str(
        model_dir.resolve()
    )
    if same and not force:
        return dst, 0.0
    start = time.perf_counter()
    convert_checkpoint(model_dir, dst)
    return dst, time.perf_counter() - start


def _skip_sanity(fp16_dir: Path, awq_dir: Path, prompts: Any, threshold: float) -> Any:
    """No sanity check (the quick path's weights are only for speed and memory figures)."""
    from legal_eagle.sanity import SanityResult

    return SanityResult(
        agreement=0.0,
        last_token_agreement=0.0,
        positions=0,
        threshold=threshold,
        passed=True,
        method="skipped by the benchmark (speed/memory only)",
        seconds=0.0,
    )


def part_quick_awq(args: Mapping[str, Any]) -> dict[str, Any]:
    """4-bit weights for the speed and memory parts, fast: data-free AWQ, no sanity check.

    The kernels and memory are the same as the app's AWQ weights; only the scales differ.
    """
    from legal_eagle.calibration import CalibrationSpec
    from legal_eagle.quantize import QuantRequest, quantize_model

    work, out = Path(args["work_dir"]), Path(args["awq_dir"])
    start = time.perf_counter()
    src, convert_s = llama_source(Path(args["dir"]), work, force=False)
    try:
        quantize_model(
            QuantRequest(src, group_size=int(args.get("group_size", 128)), calib=CalibrationSpec(source="none"),
                         min_agreement=0.0),
            out,
            sanity_check=_skip_sanity,
        )
        method = "data-free AWQ"
    except Exception as exc:  # data-free mode refused: a few calibration chunks instead
        log.warning("data-free AWQ failed (%r); using 8 calibration chunks", exc)
        quantize_model(
            QuantRequest(src, group_size=int(args.get("group_size", 128)), calib=CalibrationSpec(max_samples=8),
                         min_agreement=0.0),
            out,
            sanity_check=_skip_sanity,
        )
        method = "AWQ, 8 x 512 calibration tokens"
    return {
        "awq_dir": str(out),
        "method": method,
        "convert_s": convert_s,
        "seconds": time.perf_counter() - start,
    }


def part_make_fp8(args: Mapping[str, Any]) -> dict[str, Any]:
    """Blocked FP8 weights of the fp16 Llama checkpoint ``args['dir']`` in ``args['fp8_dir']`` (target 6)."""
    from legal_eagle.fp8 import write_fp8_checkpoint

    return write_fp8_checkpoint(Path(args["dir"]), Path(args["fp8_dir"]))


def _first_token(engine: Any) -> float:
    """Seconds to the first token of a first question (the answer then runs to 32 tokens)."""
    from legal_eagle.bench.load import build_messages, engine_request
    from legal_eagle.bench.parts import PERSONA, fixed_length
    from legal_eagle.engines.base import SamplingParams

    question = build_messages(PERSONA, [], "公司拖欠工资三个月，我可以解除劳动合同吗？")
    with fixed_length():
        result = engine_request(engine, question, SamplingParams(max_new_tokens=32, greedy=True))
    if result.ttft_s is None:
        raise RuntimeError("the first answer produced no token")
    return result.ttft_s


def _load_awq(awq_dir: Path, args: Mapping[str, Any]) -> Any:
    from legal_eagle.bench.parts import engine_settings
    from legal_eagle.engines.turbomind import TurbomindEngine

    return TurbomindEngine.load(
        awq_dir, model_format="awq", tp=1, name="bench-start", **engine_settings(args)
    )


def part_cold(args: Mapping[str, Any]) -> dict[str, Any]:
    """First start with fp16 weights on disk: convert, quantize (the app's AWQ), load, first token."""
    stages: dict[str, float] = {"process start + imports": 0.0}
    t0 = time.perf_counter()
    import torch  # noqa: F401  (the imports a first start pays for)

    from legal_eagle.calibration import CalibrationSpec
    from legal_eagle.quantize import QuantRequest, quantize_model

    stages["process start + imports"] = time.time() - float(args["spawn_time"])
    work, out = Path(args["work_dir"]), Path(args["out_dir"])
    if out.exists():
        shutil.rmtree(out)  # a cold start must not find a published result
    src, convert_s = llama_source(Path(args["dir"]), work, force=True)
    stages["convert InternLM2 -> Llama"] = convert_s
    t = time.perf_counter()
    calib = (
        CalibrationSpec(max_samples=int(args["calib_samples"]))
        if args.get("calib_samples")
        else CalibrationSpec()
    )
    _, manifest = quantize_model(
        QuantRequest(src, calib=calib, min_agreement=float(args.get("min_agreement", 0.0))), out
    )
    stages["AWQ quantize + sanity check"] = time.perf_counter() - t
    t = time.perf_counter()
    engine = _load_awq(out, args)
    stages["TurboMind load"] = time.perf_counter() - t
    t = time.perf_counter()
    ttft = _first_token(engine)
    stages["first token"] = ttft
    total = sum(stages.values())
    engine.close()
    log.info("cold start %.1f s (%s)", total, stages)
    return {
        "stages": stages,
        "total_s": total,
        "awq_dir": str(out),
        "measured_s": time.perf_counter() - t0,
        "quantization": manifest.get("quantization"),
        "quantize_seconds": manifest.get("seconds"),
        "sanity": json.loads(json.dumps(manifest.get("sanity_check"), default=str)),
    }


def part_warm(args: Mapping[str, Any]) -> dict[str, Any]:
    """A new process: imports, load of the published 4-bit weights, first token."""
    import lmdeploy  # noqa: F401
    import torch  # noqa: F401

    stages = {"process start + imports": time.time() - float(args["spawn_time"])}
    t = time.perf_counter()
    engine = _load_awq(Path(args["awq_dir"]), args)
    stages["TurboMind load"] = time.perf_counter() - t
    stages["first token"] = _first_token(engine)
    engine.close()
    return {"stages": stages, "total_s": sum(stages.values())}
