"""Run one benchmark part in a child process and collect its JSON result.

One engine per process: GPU memory read through NVML is then that engine's alone, and a
TurboMind abort (it ends the whole process on some CUDA errors) costs one part, not the run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from legal_eagle.bench.report import RequestResult
from legal_eagle.engines.base import SamplingParams

log = logging.getLogger(__name__)


def child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """This process's environment plus ``extra``, this checkout first on PYTHONPATH, hubs off by default."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    quiet = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return {**quiet, **os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""), **(extra or {})}


def run_child(
    part: str, args: Mapping[str, Any], *, timeout_s: float, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``python -m legal_eagle.bench --part PART`` in a child; its result dict, or ``{"error": ...}``.

    Args:
        part: a name in ``parts.PARTS``.
        args: JSON-ready arguments of the part (``spawn_time`` is added: the parent's wall clock).
        timeout_s: kill the child after this long.
        env: extra environment variables for the child (e.g. TM_GEMM_TUNE).

    Returns:
        The part's result; ``exit_code`` is added when the child exited non-zero after writing it
        (TurboMind sometimes aborts at exit; the figures before that are sound).
    """
    with tempfile.TemporaryDirectory(prefix="le-bench-") as tmp:
        out = Path(tmp) / "result.json"
        payload = {**args, "spawn_time": time.time()}
        cmd = [
            sys.executable,
            "-m",
            "legal_eagle.bench",
            "--part",
            part,
            "--part-args",
            json.dumps(payload),
            "--result-file",
            str(out),
        ]
        log.info("part %s: starting child process", part)
        try:
            proc = subprocess.run(cmd, env=child_env(env), timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"part {part} timed out after {timeout_s:.0f} s"}
        if not out.is_file():
            return {"error": f"part {part} exited with code {proc.returncode} without a result (see its log)"}
        data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    if proc.returncode != 0:
        data["exit_code"] = proc.returncode
    return data


def process_consumers(
    url: str,
    questions: Sequence[str],
    persona: str,
    params: SamplingParams,
    users: int,
    rounds: int,
    kind: str = "gradio",
) -> list[RequestResult]:
    """The app's users in a child process (apart from the app's own GIL): gradio_client clients,
    or with ``kind="page"`` clients that speak the web page's protocol (``load.page_request``)."""
    args = {
        "kind": kind,
        "url": url,
        "questions": list(questions),
        "persona": persona,
        "params": params.as_dict(),
        "users": users,
        "rounds": rounds,
    }
    data = run_child("consumers", args, timeout_s=600)
    if data.get("error"):
        raise RuntimeError(f"consumer process failed: {data['error']}")
    return [RequestResult(**r) for r in data["results"]]
