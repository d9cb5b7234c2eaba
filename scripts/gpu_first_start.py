"""GPU proof of the model path: first start (convert + AWQ + load) and a warm second start.

Run on the GPU machine from the repo root (after ``. /opt/lmd/env.sh``)::

    python3 scripts/gpu_first_start.py --work /root/le --out "$OUT"

It builds a RANDOM checkpoint in InternLM2-chat-7B's shape and format (what the ModelScope
download yields, random weights), places it as the "downloaded" model, runs
``python app.py`` exactly as a Space would, follows the start page through ``/healthz``,
holds a two-turn conversation through ``gradio_client``, stops the app, starts it again
and checks that the quantized copy (4-bit AWQ, or FP8 with ``--extra "--model-format fp8"``)
is reused. Prints a table and writes ``first_start.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE_7B = dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                vocab_size=92544)
QUESTIONS = ["公司拖欠工资三个月，我可以立即解除劳动合同并要求经济补偿吗？", "那经济补偿应该怎么计算？"]


def health(port: int) -> dict[str, Any] | None:
    """The app's /healthz JSON (200 or 503), or None while the server is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())
    except OSError:
        return None


def start_app(model: Path, cache: Path, port: int, log: Path, extra: list[str]) -> subprocess.Popen[bytes]:
    """``python app.py`` as a host would run it."""
    cmd = [sys.executable, "app.py", "--model-path", str(model), "--cache-dir", str(cache), "--port", str(port),
           "--backend", "turbomind", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def follow(proc: subprocess.Popen[bytes], port: int, limit_s: float) -> tuple[list[tuple[float, str, Any]], float]:
    """Poll /healthz until ready or failed; returns the stage timeline and seconds to ready."""
    started = time.monotonic()
    timeline: list[tuple[float, str, Any]] = []
    page_up: float | None = None
    while time.monotonic() - started < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}")
        state = health(port)
        now = time.monotonic() - started
        if state is not None:
            page_up = page_up if page_up is not None else now
            chat = state.get("services", {}).get("chat", state)
            if not timeline or timeline[-1][1] != chat.get("stage"):
                timeline.append((round(now, 1), chat.get("stage"), chat.get("message")))
                print(f"[{now:6.1f}s] {chat.get('message')}", flush=True)
            if chat.get("stage") == "ready":
                return timeline, now
            if chat.get("stage") == "failed":
                raise RuntimeError(f"preparation failed: {chat}")
        time.sleep(1.0)
    raise TimeoutError(f"not ready after {limit_s} s")


def _text(message: dict[str, Any]) -> str:
    """A chatbot message's text (Gradio 6 sends content as a list of {"text": ...} parts)."""
    content = message.get("content") or ""
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def converse(port: int) -> list[dict[str, Any]]:
    """Two turns through gradio_client; client-side first-token time and the app's own figures."""
    from gradio_client import Client

    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    turns = []
    for question in QUESTIONS:
        sent = time.monotonic()
        job = client.submit(question, "您是一个专业的律师。", 0.7, 0.8, 256, 1.005, True, api_name="/chat")
        first = None
        updates: list[tuple[float, int]] = []  # (seconds since sent, characters of the answer so far)
        for update in job:
            chat = update[0]
            now = time.monotonic() - sent
            answer = _text(chat[-1]) if len(chat) >= 2 and chat[-1].get("role") == "assistant" else ""
            updates.append((round(now, 3), len(answer)))
            if first is None and answer:
                first = now
        chat, _, status = job.outputs()[-1]
        total = time.monotonic() - sent
        tokens = int(re.search(r"(\d+) tokens", status).group(1))  # type: ignore[union-attr]
        rate = re.search(r"([\d.]+) tokens/s", status)
        turns.append({"question": question, "client_ttft_s": round(first or total, 3), "total_s": round(total, 2),
                      "tokens": tokens, "app_tok_s": float(rate.group(1)) if rate else None, "status": status,
                      "answer_head": _text(chat[-1])[:80], "updates": len(updates),
                      "first_updates": updates[:5], "last_updates": updates[-3:]})
        print(f"turn: {turns[-1]}", flush=True)
    return turns


def compare(port: int) -> dict[str, Any]:
    """The comparison tab through gradio_client: plan, then one greedy sequential fp16 vs 4-bit comparison."""
    from gradio_client import Client

    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    plan = client.predict(api_name="/compare_plan")
    print(f"compare plan: {plan}", flush=True)
    if "不可用" in plan:  # e.g. the --tiny CPU dry run: the tab refuses, with this reason
        return {"plan": plan}
    sent = time.monotonic()
    out = client.submit(QUESTIONS[0], api_name="/compare", max_new_tokens=256).result()
    result = {"plan": plan, "seconds": round(time.monotonic() - sent, 1), "fp16_figures": out[2],
              "awq_figures": out[3], "agreement": out[4], "status": out[7],
              "fp16_head": _text(out[0][-1])[:60], "awq_head": _text(out[1][-1])[:60]}
    print(f"compare: {json.dumps(result, ensure_ascii=False)}", flush=True)
    return result


def gpu_memory(pid: int) -> int | None:
    """GPU memory the app process holds (NVML)."""
    from legal_eagle import metrics

    return metrics.gpu_memory_used_by_process(pid)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the app like Ctrl-C, then harder."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("/root/le"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--limit", type=float, default=420.0, help="seconds allowed for the first start")
    parser.add_argument("--extra", default="", help="extra app flags, space separated")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the fp16 vs 4-bit tab on the second start (e.g. with --extra '--model-format fp8')")
    parser.add_argument("--tiny", action="store_true", help="dry run on a CPU: tiny model, transformers backend")
    parser.add_argument("--runs", default="first,second",
                        help="which starts to make (first,second); results merge into first_start.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, cache = args.work / "downloaded-internlm2-7b-random", args.work / "cache"
    saved = args.out / "first_start.json"
    result: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}
    if not (model / "config.json").exists():
        from legal_eagle.tiny_model import build_tiny_checkpoint

        t = time.monotonic()
        shape: dict[str, Any] = {} if args.tiny else {**SHAPE_7B, "device": "cuda"}
        build_tiny_checkpoint(model, arch="internlm2", dtype="float16", **shape)
        result["build_random_7b_s"] = round(time.monotonic() - t, 1)
        print(f"random 7B InternLM2 checkpoint written in {result['build_random_7b_s']} s", flush=True)
    # Random weights: the 4-bit vs fp16 agreement is measured and logged, but not a gate (--min-agreement 0).
    extra = ["--min-agreement", "0", *args.extra.split()] + (["--backend", "transformers"] if args.tiny else [])
    for run in args.runs.split(","):
        proc = start_app(model, cache, args.port, args.out / f"app_{run}.log", extra)
        try:
            timeline, ready_s = follow(proc, args.port, args.limit)
            turns = converse(args.port)
            result[run] = {"ready_s": round(ready_s, 1), "timeline": timeline, "turns": turns,
                           "gpu_memory_bytes": gpu_memory(proc.pid)}
            if run == "second" and not args.no_compare:  # the fp16 vs 4-bit tab of the same running app
                result[run]["compare"] = compare(args.port)
                result[run]["gpu_memory_after_compare_bytes"] = gpu_memory(proc.pid)
        finally:
            stop(proc)
        manifests = sorted(cache.glob("*/quant_manifest.json"))
        if manifests:
            result["quant_manifest"] = json.loads(manifests[-1].read_text())
        saved.write_text(json.dumps(result, ensure_ascii=False, indent=2))
    if not {"first", "second"} <= result.keys():
        return 0
    first, second = result["first"], result["second"]
    stages_second = [stage for _, stage, _ in second["timeline"]]
    print("\n| run | ready (s) | stages | GPU memory (GiB) | turn-1 TTFT (s) | decode tok/s (app) |")
    print("|---|---|---|---|---|---|")
    for name, r in (("first start", first), ("second start", second)):
        stages = " → ".join(stage for _, stage, _ in r["timeline"])
        mem = (r["gpu_memory_bytes"] or 0) / 2**30
        print(f"| {name} | {r['ready_s']} | {stages} | {mem:.2f} | {r['turns'][0]['client_ttft_s']} | "
              f"{r['turns'][0]['app_tok_s']} / {r['turns'][1]['app_tok_s']} |")
    reused = "quantizing" not in stages_second
    print(f"\nsecond start reused the quantized copy: {reused}")
    return 0 if reused else 1


if __name__ == "__main__":
    raise SystemExit(main())
