#!/usr/bin/env python3
"""GPU proof of the fp16 vs 4-bit comparison tab: plan, load, compare, measure, on a real GPU.

Given a RANDOM 7B-shaped fp16 checkpoint (InternLM2 or Llama layout) and its AWQ copy::

    python3 scripts/gpu_compare.py --fp16 DIR --awq DIR [--out "$OUT"] [--scenarios 23.7,36,full]

or let ``scripts/gpu_proof.py``'s build stages make them first (random weights, about a minute)::

    python3 scripts/gpu_compare.py --make /tmp/gpu_proof --out "$OUT"

Each scenario runs in its own process (TurboMind aborts the process when a load runs out of
memory, and memory is only honestly free in a fresh process). A scenario with a number
first fills the GPU with a torch ballast tensor so that only that many GB stay free (23.7: an
A10 24 GB after boot, planned with its 24.1 GB total; 36: tight); "full" uses the whole
GPU. Then, like the app: plan before
loading, load the 4-bit chat engine with the plan's KV share, build the comparison tab
(``build_compare_tab`` in its own Blocks) and drive it with gradio_client: the plan, one
comparison per timing mode, a batch over the shipped questions (CSV) while a chat answer
streams from the 4-bit engine at the same time. GPU memory is NVML's per-process figure,
taken as deltas around each load. Results: ``$OUT/compare_<scenario>.json|.csv`` and
``$OUT/compare_summary.md`` (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PERSONA = "您是一个专业的律师，用户会对您提出法律方面的问题，请您根据您的知识进行专业、准确的回答。"
QUESTION = "公司连续两个月拖欠工资，我可以立即解除劳动合同并要求经济补偿吗？"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gb(n: Any) -> str:
    return "—" if n is None else f"{n / 1e9:.1f}"


def proc_mem() -> int | None:
    """GPU memory of this process (NVML); device-wide use where the process is not listed."""
    from legal_eagle import metrics

    mine = metrics.gpu_memory_used_by_process()
    if mine is not None:
        return mine
    free_total = metrics.gpu_free_total()
    return None if free_total is None else free_total[1] - free_total[0]


def scenario(args: argparse.Namespace) -> dict[str, Any]:
    """One scenario in this process; returns what it measured."""
    import gradio as gr
    import torch
    from gradio_client import Client

    from legal_eagle import metrics
    from legal_eagle.compare import load_questions
    from legal_eagle.config import Settings
    from legal_eagle.engines.base import Message, SamplingParams
    from legal_eagle.engines.turbomind import TurbomindEngine
    from legal_eagle.planner import PAUSE_REASON, PlannedProvider, plan_comparison, weights_bytes
    from legal_eagle.prompts import load_prompts
    from legal_eagle.service import ModelService
    from legal_eagle.ui.compare_tab import CompareHandlers, build_compare_tab

    res: dict[str, Any] = {"scenario": args.child, "timeline": []}

    def mark(label: str) -> None:
        free_total = metrics.gpu_free_total()
        res["timeline"].append({"t": round(time.monotonic() - t0, 1), "event": label, "process": proc_mem(),
                                "free": free_total[0] if free_total else None})
        free_now = res["timeline"][-1]["free"]
        print(f"[{args.child}] {label}: process {_gb(proc_mem())} GB, free {_gb(free_now)} GB", flush=True)

    t0 = time.monotonic()
    torch.zeros(1, device="cuda")
    free0, total = metrics.gpu_free_total()  # type: ignore[misc]
    ballast = None
    if args.child != "full":
        take = free0 - int(float(args.child) * 1e9)
        if take > 0:
            ballast = torch.empty(take, dtype=torch.uint8, device="cuda")
    mark("ballast placed" if ballast is not None else "start")
    free, total = metrics.gpu_free_total()  # type: ignore[misc]
    if ballast is not None:  # plan as on a card of that size: an A10 has 23.7 of 24.1 GB free after boot
        total = min(total, int((float(args.child) + 0.45) * 1e9))  # (reserve and headroom are shares of it)
    awq_w, fp16_w = weights_bytes(args.awq), weights_bytes(args.fp16)
    res.update(total=total, free_at_plan=free, awq_weights=awq_w, fp16_weights=fp16_w,
               ballast=ballast.numel() if ballast is not None else 0)
    startup = plan_comparison(free, total, awq_w, fp16_w, chat_engine_loaded=False,
                              chat_cache_share_wanted=args.cache)
    res["plan_startup"] = startup.as_dict()
    print(startup.describe(), flush=True)
    chat_share = startup.chat_cache_share or args.cache
    before = proc_mem()
    start = time.perf_counter()
    chat_loads: list[float] = []

    def load_chat() -> Any:
        started = time.perf_counter()
        engine = TurbomindEngine.load(args.awq, model_format="awq", session_len=args.session_len,
                                      cache_max_entry_count=chat_share, quant_policy=0,
                                      max_batch_size=args.max_batch, tp=1, name="4-bit AWQ")
        chat_loads.append(round(time.perf_counter() - started, 1))
        mark("4-bit chat engine loaded")
        return engine

    chat = load_chat()
    res["chat_load_s"] = round(time.perf_counter() - start, 1)
    after = proc_mem()
    awq_bytes = None if after is None else after - (before or 0)
    res.update(chat_share=chat_share, awq_engine_bytes=awq_bytes)
    service = ModelService.ready_with(chat, name="chat")
    del chat  # the service owns it: a comparison closes it, and no reference here may pin its memory
    fp16_loads: list[dict[str, Any]] = []

    def load_fp16(share: float) -> Any:
        mark(f"loading fp16 (share {share})")
        started = time.perf_counter()
        engine = TurbomindEngine.load(args.fp16, model_format="hf", session_len=args.session_len,
                                      cache_max_entry_count=share, quant_policy=0, max_batch_size=4, tp=1,
                                      name="fp16")
        fp16_loads.append({"share": share, "load_s": round(time.perf_counter() - started, 1)})
        mark("fp16 engine loaded")
        return engine

    def suspend_chat(say: Any) -> Any:
        def said(line: str) -> None:
            mark(line)
            say(line)
        return service.suspended(load_chat, PAUSE_REASON, progress=said)

    def gpu_free_total() -> tuple[int, int] | None:
        now = metrics.gpu_free_total()
        return None if now is None else (now[0], total)

    provider = PlannedProvider(load_fp16, sizes=lambda: (awq_w, fp16_w),
                               chat_engine_loaded=lambda: service.engine_or_none is not None,
                               gpu_free_total=gpu_free_total, process_memory=proc_mem, suspend_chat=suspend_chat,
                               chat_memory=lambda: awq_bytes)
    res["plan_after_chat"] = provider.plan.as_dict()
    settings = Settings(session_len=args.session_len, max_new_tokens_cap=min(args.session_len, 4096))
    questions = load_questions()[: args.questions]
    handlers = CompareHandlers(service, provider, settings, load_prompts(),
                               questions=questions, chat_memory=lambda: awq_bytes)
    with gr.Blocks() as demo:
        build_compare_tab(handlers)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True,
                            quiet=True, show_error=True)
    client = Client(url, verbose=False)
    res["plan_markdown"] = client.predict(api_name="/compare_plan")
    sampling = (PERSONA, "sequential", True, 0.7, 0.8, args.tokens, -1)
    res["single"] = {}
    for mode in ("sequential", "concurrent"):
        try:
            out = client.predict(QUESTION, PERSONA, mode, True, 0.7, 0.8, args.tokens, -1,
                                 api_name="/compare")
            _, _, figs_fp16, figs_awq, agree, speed, memory, status, _ = out  # the State is not sent
            res["single"][mode] = {"fp16": figs_fp16, "awq": figs_awq, "agreement": agree, "status": status,
                                   "speed": speed.get("data"), "memory": memory.get("data")}
        except Exception as exc:  # an unavailable plan ends here, with the tab's Chinese reason
            res["single"][mode] = {"error": str(exc)}
        mark(f"after {mode} comparison")
        print(json.dumps(res["single"][mode], ensure_ascii=False, indent=1), flush=True)
    chat_during: dict[str, Any] = {}

    def chat_while_batch() -> None:  # as the chat tab does: wait out a pause, then lease the engine
        time.sleep(2.0)
        started, tokens, reason, waited = time.perf_counter(), 0, None, 0.0
        try:
            messages: list[Message] = [{"role": "system", "content": PERSONA},
                                       {"role": "user", "content": "房东不退押金怎么办？"}]
            while True:
                while service.paused() is not None:
                    time.sleep(0.2)
                try:
                    lease = service.lease()
                    engine = lease.__enter__()
                    break
                except Exception:
                    if service.paused() is None:
                        raise
            waited = time.perf_counter() - started
            try:
                for chunk in engine.stream(messages, SamplingParams(max_new_tokens=args.tokens, greedy=True)):
                    tokens, reason = chunk.n_tokens, chunk.finish_reason or reason
            finally:
                lease.__exit__(None, None, None)
            seconds = round(time.perf_counter() - started, 2)
            chat_during.update(tokens=tokens, finish_reason=reason, seconds=seconds, waited_s=round(waited, 2))
        except Exception as exc:
            chat_during.update(error=f"{type(exc).__name__}: {exc}")

    chatter = threading.Thread(target=chat_while_batch)
    chatter.start()
    try:
        table, csv_path, status = client.predict(*sampling, api_name="/compare_batch")
        res["batch"] = {"status": status, "headers": table["headers"], "total": table["data"][-1]}
        shutil.copyfile(csv_path, args.out / f"compare_{args.child}.csv")
    except Exception as exc:
        res["batch"] = {"error": str(exc)}
    chatter.join()
    res["chat_during_batch"] = chat_during
    mark("after batch")
    res.update(fp16_loads=fp16_loads, provider_loads=provider.loads, chat_loads=chat_loads,
               plan_in_force=provider.plan.mode)
    demo.close()
    provider.close()
    mark("fp16 provider closed")
    service.close()
    return res


def summary(results: list[dict[str, Any]]) -> str:
    """A Markdown table of all scenarios, then per-scenario detail."""
    head = ("| scenario | total / free at plan (GB) | startup plan | chat KV share | plan after chat "
            "| 4-bit Δ GB | fp16 loads (s) | batch fp16 TTFT ms / tok/s | batch 4-bit TTFT ms / tok/s "
            "| similarity | same cites | chat during batch |")
    lines = [head, "|" + "---|" * 12]
    head = head.replace("| fp16 loads (s) |", "| fp16 / 4-bit loads (s) |")
    lines[0] = head
    for r in results:
        if "error" in r:
            failed = f"ABORTED/FAILED rc={r.get('rc')}"
            lines.append(f"| {r['scenario']} | — | {failed} | | | | | | | | | {r['error'][-120:]} |")
            continue
        batch = r.get("batch", {})
        cols = dict(zip(batch.get("headers", []), batch.get("total", []), strict=False))
        loads = (", ".join(str(x["load_s"]) for x in r.get("fp16_loads", [])) or "0") + " / " + (
            ", ".join(str(x) for x in r.get("chat_loads", [])) or "—")
        chat = r.get("chat_during_batch", {})
        lines.append(
            f"| {r['scenario']} | {_gb(r['total'])} / {_gb(r['free_at_plan'])} | {r['plan_startup']['mode']} "
            f"| {r['chat_share']} | {r['plan_after_chat']['mode']} | {_gb(r['awq_engine_bytes'])} | {loads} "
            f"| {cols.get('fp16_ttft_ms', '—')} / {cols.get('fp16_decode_tok_s', '—')} "
            f"| {cols.get('awq_ttft_ms', '—')} / {cols.get('awq_decode_tok_s', '—')} "
            f"| {cols.get('char_similarity', '—')} | {cols.get('same_citations', '—')} "
            f"| {chat.get('finish_reason', chat.get('error', '—'))} {chat.get('tokens', '')} "
            f"(waited {chat.get('waited_s', '—')} s) |")
    for r in results:
        detail = json.dumps(r, ensure_ascii=False, indent=1)[:6000]
        lines += ["", f"## {r['scenario']}", "", "```", detail, "```"]
    return "\n".join(lines)


def make_checkpoints(work: Path, out: Path) -> tuple[Path, Path]:
    """Build the random 7B fp16 checkpoint and its random AWQ copy with scripts/gpu_proof.py's stages."""
    proof = [sys.executable, str(ROOT / "scripts" / "gpu_proof.py"), "--out", str(out), "--work", str(work)]
    subprocess.run(proof + ["--stage", "build", "--json", str(out / "build.json")], check=True)
    fp16 = Path(json.loads((out / "build.json").read_text())["dir"])
    awq_json = out / "awq.json"
    subprocess.run(proof + ["--stage", "awq", "--model", str(fp16), "--json", str(awq_json)], check=True)
    return fp16, Path(json.loads(awq_json.read_text())["dir"])


def main(argv: list[str] | None = None) -> int:
    """Orchestrate the scenarios (or run one with --child)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp16", type=Path, help="fp16 checkpoint (InternLM2 or Llama layout)")
    p.add_argument("--awq", type=Path, help="its AWQ 4-bit copy")
    p.add_argument("--make", type=Path, help="build random 7B checkpoints here first (gpu_proof.py)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_compare_out")))
    p.add_argument("--scenarios", default="23.7,36,full", help="GB left free by a ballast tensor, or 'full'")
    p.add_argument("--questions", type=int, default=4, help="batch questions (of the shipped 12)")
    p.add_argument("--tokens", type=int, default=256, help="max_new_tokens per answer")
    p.add_argument("--session-len", type=int, default=4096)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--cache", type=float, default=0.5, help="the chat engine's wanted cache_max_entry_count")
    p.add_argument("--timeout", type=float, default=240, help="seconds per scenario")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        result = scenario(args)
        (args.out / f"compare_{args.child}.json").write_text(json.dumps(result, ensure_ascii=False, indent=1))
        sys.stdout.flush()
        os._exit(0)  # TurboMind may abort at interpreter exit; the results are on disk
    if args.make:
        args.fp16, args.awq = make_checkpoints(args.make, args.out)
    if not (args.fp16 and args.awq):
        p.error("give --fp16 and --awq, or --make")
    results = []
    for name in args.scenarios.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--fp16", str(args.fp16),
               "--awq", str(args.awq), "--out", str(args.out), "--questions", str(args.questions), "--tokens",
               str(args.tokens), "--session-len", str(args.session_len), "--max-batch", str(args.max_batch),
               "--cache", str(args.cache)]
        print(f"=== scenario {name}", flush=True)
        log_path = args.out / f"compare_{name}.log"
        try:
            with log_path.open("w") as log:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
                rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = 124
        result_path = args.out / f"compare_{name}.json"
        if result_path.exists():
            results.append(json.loads(result_path.read_text()))
        else:
            tail = log_path.read_text(errors="replace")[-1500:]
            results.append({"scenario": name, "rc": rc, "error": tail.replace("\n", " ⏎ ")})
        print(log_path.read_text(errors="replace")[-3000:], flush=True)
    text = summary(results)
    (args.out / "compare_summary.md").write_text(text)
    print(text)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
