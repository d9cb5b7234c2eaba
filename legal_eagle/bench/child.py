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


def part_command(part: str, args: Mapping[str, Any], result_file: Path) -> list[str]:
    """The command line that runs one part in a child process and writes its JSON to ``result_file``."""
    return [sys.executable, "-m", "legal_eagle.bench", "--part", part, "--part-args", json.dumps(args),
            "--result-file", str(result_file)]


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
        cmd = part_command(part, payload, out)
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


READY = "LE-BENCH-CONSUMERS-READY"
GO = "go"


def consumer_processes(users: int, cores: int | None = None) -> int:
    """How many processes the app's ``users`` run in: one per user, up to half the cores.

    Real users sit on their own machines. 32 gradio_client clients in one Python process share
    one GIL with their polling threads (``stream_sse_v1plus`` sleeps 50 ms between looks, each
    job posts through a new ``httpx`` client): that measured the client library, not the app.
    The other half of the cores is left to the app's process and TurboMind.
    """
    return max(1, min(users, (cores or os.cpu_count() or 2) // 2))


def process_consumers(
    url: str,
    questions: Sequence[str],
    persona: str,
    params: SamplingParams,
    users: int,
    rounds: int,
    kind: str = "gradio",
    processes: int | None = None,
    timeout_s: float = 600.0,
) -> list[RequestResult]:
    """The app's users in child processes (apart from the app's own GIL): gradio_client clients,
    or with ``kind="page"`` clients that speak the web page's protocol (``load.page_request``).

    The users are split over ``processes`` children (default ``consumer_processes``); each sets
    its users up, says it is ready and waits, so that all users start together.
    """
    n = max(1, min(users, processes or consumer_processes(users)))
    sizes = [users // n + (1 if i < users % n else 0) for i in range(n)]
    firsts = [sum(sizes[:i]) for i in range(n)]
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="le-consumers-") as tmp:
        procs: list[tuple[subprocess.Popen[str], Path]] = []
        try:
            for i, (first, size) in enumerate(zip(firsts, sizes, strict=True)):
                args = {"kind": kind, "url": url, "questions": list(questions), "persona": persona,
                        "params": params.as_dict(), "users": size, "first_user": first, "rounds": rounds,
                        "gate": True}
                out = Path(tmp) / f"result-{i}.json"
                proc = subprocess.Popen(part_command("consumers", args, out), env=child_env(None),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                procs.append((proc, out))
            for proc, _ in procs:  # every child has set its users up
                _wait_ready(proc, deadline)
            for proc, _ in procs:
                assert proc.stdin is not None
                proc.stdin.write(GO + "\n")
                proc.stdin.flush()
            results: list[RequestResult] = []
            for proc, out in procs:
                proc.wait(max(1.0, deadline - time.monotonic()))
                data = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {
                    "error": f"exited with code {proc.returncode} without a result"}
                if data.get("error"):
                    raise RuntimeError(f"consumer process failed: {data['error']}")
                results += [RequestResult(**r) for r in data["results"]]
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return results


def _wait_ready(proc: subprocess.Popen[str], deadline: float) -> None:
    """Read the child's stdout up to its ready line (it prints nothing else there that matters)."""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"consumer process exited with code {proc.wait()} before it was ready")
        if line.strip() == READY:
            return
    raise RuntimeError("consumer process did not get ready in time")


def wait_for_go() -> None:
    """In a consumer child: say ready on stdout, then block until the parent's start signal."""
    print(READY, flush=True)
    line = sys.stdin.readline()
    if line.strip() != GO:
        raise RuntimeError(f"no start signal from the parent (got {line!r})")
