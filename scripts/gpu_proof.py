#!/usr/bin/env python3
"""GPU proof run: TurboMind fp16 and AWQ 4-bit on RANDOM checkpoints in InternLM2-chat-7B's shape.

One command on the GPU machine (after ``. /opt/lmd/env.sh``), logs and figures under ``$OUT``::

    python3 scripts/gpu_proof.py --out "$OUT" [--work /tmp/gpu_proof] [--hook 'CMD'] [--skip-awq]

Stages, each in its own process so GPU memory figures are honest:
  build  random InternLM2-format checkpoint (hidden 4096, 32 layers, 32/8 heads, 14336, vocab 92544)
  awq    convert it to the Llama layout (legal_eagle.convert) and run LMDeploy's AWQ (data-free, cuda)
  bench  load TurbomindEngine (fp16, then AWQ): load time, NVML memory, TTFT, decode tok/s, 10-turn
         TTFT with prefix caching, abort check, 16 concurrent streams
  hook   optional shell command (e.g. the app's first start) with PROOF_* paths in its environment
The weights are random: only speed and memory mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE_7B = {"hidden_size": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8,
            "intermediate_size": 14336, "vocab_size": 92544}
SHAPE_TINY = {"hidden_size": 512, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 1024,
              "vocab_size": 2048}  # --tiny: a smoke test of this script (CPU works up to the benches)
PERSONA = "您是一个专业的律师，用户会对您提出法律方面的问题，请您根据您的知识进行专业、准确的回答。"
PROMPT: list[Any] = [{"role": "system", "content": PERSONA},
                     {"role": "user", "content": "公司拖欠工资两个月，我可以怎么维权？需要准备哪些证据？"}]


def _device() -> str:
    """cuda when torch sees a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def log(out: Path, text: str) -> None:
    """Print and append to $OUT/proof.log."""
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    print(line, flush=True)
    with open(out / "proof.log", "a", encoding="utf-8") as f:
        f.write(line + "\n")


# ----------------------------------------------------------------------------- stages (children)


def stage_build(work: Path, tiny: bool) -> dict[str, Any]:
    """Random InternLM2-format 7B-shaped checkpoint; in-vocabulary output rows made to win."""
    import sentencepiece as spm
    import torch
    from safetensors.torch import load_file, save_file

    from legal_eagle.tiny_model import build_tiny_checkpoint

    start = time.perf_counter()
    device = _device()
    out = build_tiny_checkpoint(work / "internlm2-7b-fp16", device=device,
                                max_shard_bytes=(2 * 1024**3 if not tiny else 4 * 1024**2),
                                **(SHAPE_TINY if tiny else SHAPE_7B))
    built_s = time.perf_counter() - start
    # The tiny tokenizer has ~700 pieces in a 92544-row vocabulary: zero the other output rows and
    # enlarge the rest so answers are mostly decodable text (speed and memory are unchanged).
    n_tok = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).get_piece_size()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = out / index["weight_map"]["output.weight"]
    tensors = load_file(str(shard))
    w = tensors["output.weight"].to(device, torch.float32)
    w[n_tok:] = 0
    w[:n_tok] *= 4.0
    tensors["output.weight"] = w.to(torch.float16).cpu()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"dir": str(out), "build_s": round(built_s, 1), "total_s": round(time.perf_counter() - start, 1),
            "bytes": size, "tokenizer_pieces": n_tok}


def _random_awq_tensors(cfg: dict[str, Any], n_tok: int, device: str) -> Any:
    """Yield (name, tensor) of a random AWQ W4 g128 'gemm' checkpoint in Llama layout.

    Same names, shapes and dtypes as LMDeploy's auto_awq output (qweight [in, out/8] int32,
    qzeros [in/128, out/8] int32 with zero point 8, scales [in/128, out] fp16); embeddings,
    norms and head stay fp16. Random packed weights run the same kernels as real ones.
    """
    import torch

    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim, group = hidden // heads, 128
    gen = torch.Generator(device=device).manual_seed(0)

    def linear(prefix: str, n_in: int, n_out: int) -> Any:
        yield prefix + "qweight", torch.randint(-2**31, 2**31 - 1, (n_in, n_out // 8), generator=gen,
                                                dtype=torch.int32, device=device)
        yield prefix + "qzeros", torch.full((n_in // group, n_out // 8), -2004318072, dtype=torch.int32,
                                            device=device)  # 0x88888888: zero point 8 in every nibble
        yield prefix + "scales", torch.full((n_in // group, n_out), n_in**-0.5 / 4.6, dtype=torch.float16,
                                            device=device)

    def norm() -> Any:
        return (1.0 + 0.1 * torch.randn(hidden, generator=gen, device=device)).half()

    yield "model.embed_tokens.weight", torch.randn(vocab, hidden, generator=gen, device=device).half()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield from linear(p + "self_attn.q_proj.", hidden, heads * head_dim)
        yield from linear(p + "self_attn.k_proj.", hidden, kv * head_dim)
        yield from linear(p + "self_attn.v_proj.", hidden, kv * head_dim)
        yield from linear(p + "self_attn.o_proj.", heads * head_dim, hidden)
        yield from linear(p + "mlp.gate_proj.", hidden, inter)
        yield from linear(p + "mlp.up_proj.", hidden, inter)
        yield from linear(p + "mlp.down_proj.", inter, hidden)
        yield p + "input_layernorm.weight", norm()
        yield p + "post_attention_layernorm.weight", norm()
    yield "model.norm.weight", norm()
    head = torch.randn(vocab, hidden, generator=gen, device=device) * (4.0 * hidden**-0.5)
    head[n_tok:] = 0  # as in stage_build: answers made of the tokenizer's own pieces
    yield "lm_head.weight", head.half()


def stage_awq_random(work: Path, src: Path) -> dict[str, Any]:
    """A random AWQ checkpoint in the same shape, written directly (seconds, no calibration)."""
    import shutil

    import sentencepiece as spm
    import torch

    from legal_eagle.convert import convert_tokenizer, llama_config, read_config
    from legal_eagle.tiny_model import write_sharded

    start = time.perf_counter()
    out = work / "llama-7b-awq"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = read_config(src)
    config = llama_config(cfg)
    config["quantization_config"] = {"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm",
                                     "zero_point": True}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("generation_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    convert_tokenizer(src, out)
    n_tok = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model")).get_piece_size()
    with torch.no_grad():
        write_sharded(out, _random_awq_tensors(cfg, n_tok, _device()), 2 * 1024**3)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"dir": str(out), "mode": "random", "awq_s": round(time.perf_counter() - start, 1), "bytes": size}


def stage_awq(work: Path, src: Path, keep: bool) -> dict[str, Any]:
    """InternLM2 → Llama layout, then LMDeploy's AWQ W4 g128 without calibration data on cuda."""
    import shutil

    from lmdeploy.lite.apis.auto_awq import auto_awq

    from legal_eagle.convert import convert_checkpoint

    start = time.perf_counter()
    llama = convert_checkpoint(src, work / "llama-7b-fp16")
    convert_s = time.perf_counter() - start
    awq_dir = work / "llama-7b-awq"
    auto_awq(str(llama), work_dir=str(awq_dir), calib_samples=0, w_bits=4, w_group_size=128, device=_device(),
             dtype="float16")
    awq_s = time.perf_counter() - start - convert_s
    if not keep:
        shutil.rmtree(llama, ignore_errors=True)
    size = sum(p.stat().st_size for p in awq_dir.glob("*.safetensors"))
    return {"dir": str(awq_dir), "mode": "auto_awq", "convert_s": round(convert_s, 1), "awq_s": round(awq_s, 1),
            "bytes": size}


def _stream_timed(engine: Any, messages: Any, params: Any) -> tuple[dict[str, Any], str]:
    """One streamed answer's figures and text."""
    from legal_eagle.metrics import StreamTimer

    timer, text = StreamTimer(), ""
    for chunk in engine.stream(messages, params):
        timer.record(chunk.n_tokens)
        text += chunk.text
    timer.finish()
    return timer.as_dict(), text


def stage_bench(model: Path, fmt: str, args: argparse.Namespace, out_json: Path) -> None:
    """Load one TurbomindEngine and measure it; results are written before the engine closes."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from legal_eagle import metrics
    from legal_eagle.engines import turbomind as tm
    from legal_eagle.engines.base import SamplingParams

    res: dict[str, Any] = {"format": fmt, "model": str(model), "cache_max_entry_count": args.cache,
                           "session_len": args.session_len, "max_batch_size": args.max_batch}

    def save() -> None:
        out_json.write_text(json.dumps(res, indent=2, ensure_ascii=False))

    free_before = metrics.gpu_free_total(0)
    start = time.perf_counter()
    engine = tm.TurbomindEngine.load(model, model_format=fmt, session_len=args.session_len,
                                     cache_max_entry_count=args.cache, quant_policy=args.quant_policy,
                                     max_batch_size=args.max_batch, tp=1, enable_prefix_caching=True,
                                     name=f"proof {fmt}")
    res["load_s"] = round(time.perf_counter() - start, 2)
    res["info"] = {"quantization": engine.info.quantization, **engine.info.extra}
    free_after = metrics.gpu_free_total(0)
    res["gpu_mem_engine_bytes"] = engine.gpu_memory_bytes()
    res["gpu_mem_nvml_process_bytes"] = metrics.gpu_memory_used_by_process()
    if free_before and free_after:
        res["gpu_free_drop_bytes"] = free_before[0] - free_after[0]
        res["gpu_total_bytes"] = free_before[1]
    save()

    original = tm.generation_kwargs  # fixed-length answers: a random model must not stop early
    tm.generation_kwargs = lambda p, s: {  # type: ignore[assignment]
        **original(p, s), "ignore_eos": True, "min_new_tokens": p.max_new_tokens}
    greedy = SamplingParams(greedy=True, max_new_tokens=args.tokens)
    _stream_timed(engine, PROMPT, SamplingParams(greedy=True, max_new_tokens=16))  # warm-up
    runs = [_stream_timed(engine, PROMPT, greedy)[0] for _ in range(3)]
    res["prompt_tokens"] = engine.count_tokens(PROMPT)
    res["single"] = runs
    res["ttft_ms"] = round(1000 * statistics.median(r["ttft_s"] for r in runs), 1)
    res["decode_tok_s"] = round(statistics.median(r["decode_tok_s"] for r in runs), 1)
    first, sample_text = _stream_timed(engine, PROMPT, SamplingParams(temperature=0.7, top_p=0.8, seed=7,
                                                                        max_new_tokens=48))
    res["sample_text"] = sample_text[:200]
    save()

    # 10-turn chat: TTFT per turn with prefix caching (history's KV reused)
    history = list(PROMPT)
    turns = []
    for turn in range(10):
        figures, answer = _stream_timed(engine, history, SamplingParams(greedy=True, max_new_tokens=96))
        turns.append({"turn": turn + 1, "prompt_tokens": engine.count_tokens(history),
                      "ttft_ms": round(1000 * figures["ttft_s"], 1)})
        question = f"第{turn + 2}个问题：劳动仲裁需要多久？"
        history += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    res["multi_turn"] = turns
    save()

    # abort: close the stream mid-answer; the slot must be free at once and the engine idle
    gen: Any = engine.stream(PROMPT, SamplingParams(greedy=True, max_new_tokens=4000))
    for _ in range(5):
        next(gen)
    t_close = time.perf_counter()
    gen.close()
    res["abort_close_ms"] = round(1000 * (time.perf_counter() - t_close), 1)
    core = engine._pipe.async_engine
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (core.session_mgr.request_handle_pool.num_dispatched
                                           or core.engine.get_schedule_metrics().active_seqs):
        time.sleep(0.01)
    res["abort_ok"] = (engine.active_generations() == 0
                       and core.session_mgr.request_handle_pool.num_dispatched == 0
                       and core.engine.get_schedule_metrics().active_seqs == 0)
    save()

    # 16 concurrent streams from threads (as Gradio workers call it)
    counts: list[int] = []

    def worker() -> None:
        n = 0
        for chunk in engine.stream(PROMPT, SamplingParams(greedy=True, max_new_tokens=256)):
            n = chunk.n_tokens
        counts.append(n)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wall = time.perf_counter() - t0
    res["concurrent16"] = {"tokens": sum(counts), "wall_s": round(wall, 2),
                           "tok_s": round(sum(counts) / wall, 1), "complete": len(counts) == 16}
    res["gpu_mem_engine_after_bytes"] = engine.gpu_memory_bytes()
    res["ok"] = True
    save()
    t_close = time.perf_counter()
    engine.close()
    res["close_s"] = round(time.perf_counter() - t_close, 2)
    save()


# ----------------------------------------------------------------------------- orchestration


def run_child(out: Path, name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> int:
    """Run one stage in a fresh process, its output to $OUT/<name>.log; returns the exit code."""
    logfile = out / f"{name}.log"
    log(out, f"stage {name}: start (timeout {timeout:.0f} s) -> {logfile.name}")
    start = time.perf_counter()
    with open(logfile, "w", encoding="utf-8") as f:
        try:
            proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT,
                                  env={**os.environ, **(env or {})})
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = 124
    log(out, f"stage {name}: exit {code} after {time.perf_counter() - start:.0f} s")
    return code


def gb(n: Any) -> str:
    """Bytes as GB text."""
    return "n/a" if not isinstance(n, int) else f"{n / 1e9:.1f} GB"


def summary(out: Path, results: dict[str, Any]) -> str:
    """Markdown table of the figures."""
    rows = [("checkpoint on disk", "bytes"), ("load time", "load_s"),
            ("GPU memory (NVML, this process)", "gpu_mem_engine_bytes"),
            ("GPU free-memory drop while loading", "gpu_free_drop_bytes"),
            ("TTFT, short prompt (median of 3)", "ttft_ms"), ("decode, 1 stream (median of 3)", "decode_tok_s"),
            ("TTFT turn 1 → turn 10 (prefix caching)", "turns"),
            ("abort: close() took / engine idle after", "abort"), ("16 concurrent streams x 256 tokens", "conc")]
    cols = ["fp16", "awq"]
    lines = ["| | fp16 TurboMind (InternLM2 layout) | AWQ 4-bit TurboMind (Llama layout) |", "|---|---|---|"]
    for label, key in rows:
        cells = []
        for col in cols:
            r = results.get(col) or {}
            if key == "bytes":
                cells.append(gb(results.get(f"{col}_disk")))
            elif key in ("gpu_mem_engine_bytes", "gpu_free_drop_bytes"):
                cells.append(gb(r.get(key)))
            elif key == "load_s":
                cells.append(f"{r['load_s']} s" if "load_s" in r else "n/a")
            elif key == "ttft_ms":
                cells.append(f"{r['ttft_ms']} ms" if "ttft_ms" in r else "n/a")
            elif key == "decode_tok_s":
                cells.append(f"{r['decode_tok_s']} tok/s" if "decode_tok_s" in r else "n/a")
            elif key == "turns":
                t = r.get("multi_turn") or []
                cells.append(f"{t[0]['ttft_ms']} → {t[-1]['ttft_ms']} ms ({t[-1]['prompt_tokens']} tok)" if t
                             else "n/a")
            elif key == "abort":
                cells.append(f"{r['abort_close_ms']} ms / {r['abort_ok']}" if "abort_ok" in r else "n/a")
            else:
                c = r.get("concurrent16")
                cells.append(f"{c['tok_s']} tok/s ({c['tokens']} tok, {c['wall_s']} s)" if c else "n/a")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    extra = [f"- {col}: {json.dumps((results.get(col) or {}).get('info', {}), ensure_ascii=False)}"
             for col in cols]
    text = "\n".join(lines + ["", "Engine settings:"] + extra + ["", "Stages: " + json.dumps(
        results.get("stages", {}))])
    (out / "summary.md").write_text(text + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return text


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (orchestrator, or one stage when --stage is given)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_proof_out")))
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_proof"))
    p.add_argument("--budget", type=float, default=520.0, help="seconds for everything (stages share it)")
    p.add_argument("--tiny", action="store_true", help="tiny shape: a quick smoke test of this script")
    p.add_argument("--cache", type=float, default=0.5, help="cache_max_entry_count (the app's default 0.5)")
    p.add_argument("--session-len", type=int, default=8192)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--quant-policy", type=int, default=0)
    p.add_argument("--tokens", type=int, default=256, help="answer length for the single-stream figures")
    p.add_argument("--skip-awq", action="store_true")
    p.add_argument("--awq-mode", choices=["random", "auto"], default="random",
                   help="random: write random AWQ weights directly (seconds); auto: legal_eagle.convert + "
                        "LMDeploy auto_awq data-free on cuda (minutes)")
    p.add_argument("--keep", action="store_true", help="keep the Llama fp16 copy")
    p.add_argument("--hook", default="", help="shell command run last, with PROOF_* paths in its environment")
    p.add_argument("--hook-s", type=float, default=180.0, help="seconds kept for --hook out of --budget")
    p.add_argument("--stage", choices=["build", "awq", "bench"], help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--format", choices=["hf", "awq"], help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)

    if args.stage == "build":
        args.json.write_text(json.dumps(stage_build(args.work, args.tiny)))
        return 0
    if args.stage == "awq":
        result = (stage_awq(args.work, args.model, args.keep) if args.awq_mode == "auto"
                  else stage_awq_random(args.work, args.model))
        args.json.write_text(json.dumps(result))
        return 0
    if args.stage == "bench":
        stage_bench(args.model, args.format, args, args.json)
        sys.stdout.flush()
        os._exit(0)  # TurboMind may abort at interpreter exit; the figures are already on disk

    deadline = time.monotonic() + args.budget
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--out", str(args.out), "--work", str(args.work), "--cache", str(args.cache), "--session-len",
              str(args.session_len), "--max-batch", str(args.max_batch), "--quant-policy", str(args.quant_policy),
              "--tokens", str(args.tokens), "--awq-mode", args.awq_mode] + (["--keep"] if args.keep else []) + (
                  ["--tiny"] if args.tiny else [])
    results: dict[str, Any] = {"stages": {}}

    reserve = args.hook_s if args.hook else 0.0

    def left() -> float:
        return max(10.0, deadline - reserve - time.monotonic())

    versions = "import lmdeploy, torch; print('lmdeploy', lmdeploy.__version__, 'torch', torch.__version__)"
    env_txt = subprocess.run(["bash", "-c", f"nvidia-smi; {sys.executable} -c \"{versions}\""],
                             capture_output=True, text=True)
    (args.out / "env.txt").write_text(env_txt.stdout + env_txt.stderr)

    build_json = args.out / "build.json"
    code = run_child(args.out, "build", me + common + ["--stage", "build", "--json", str(build_json)], left())
    results["stages"]["build"] = code
    if code != 0:
        log(args.out, "build failed: see build.log")
        print(summary(args.out, results))
        return 1
    build = json.loads(build_json.read_text())
    results["fp16_disk"], results["build"] = build["bytes"], build
    fp16_dir = Path(build["dir"])

    awq_dir = None
    if not args.skip_awq:
        awq_json = args.out / "awq.json"
        code = run_child(args.out, "awq", me + common + ["--stage", "awq", "--model", str(fp16_dir), "--json",
                                                         str(awq_json)], max(90.0, left() - 150))
        results["stages"]["awq"] = code
        if code == 0:
            awq = json.loads(awq_json.read_text())
            results["awq_disk"], results["awq_stage"], awq_dir = awq["bytes"], awq, Path(awq["dir"])

    for col, model, fmt in (("fp16", fp16_dir, "hf"), ("awq", awq_dir, "awq")):
        if model is None:
            continue
        out_json = args.out / f"bench_{col}.json"
        share = left() if col == "awq" or awq_dir is None else left() / 2
        code = run_child(args.out, f"bench_{col}", me + common + ["--stage", "bench", "--model", str(model),
                                                                 "--format", fmt, "--json", str(out_json)], share)
        if out_json.exists():
            results[col] = json.loads(out_json.read_text())
            if code != 0 and results[col].get("ok"):
                log(args.out, f"bench_{col}: exit {code} after its figures were saved (TurboMind at exit)")
                code = 0
        results["stages"][f"bench_{col}"] = code

    if args.hook:
        env = {"PROOF_INTERNLM2_DIR": str(fp16_dir), "PROOF_AWQ_DIR": str(awq_dir or ""),
               "PROOF_LLAMA_DIR": str(args.work / "llama-7b-fp16"), "PROOF_OUT": str(args.out)}
        hook_s = max(10.0, deadline - time.monotonic())
        results["stages"]["hook"] = run_child(args.out, "hook", ["bash", "-c", args.hook], hook_s, env=env)

    text = summary(args.out, results)
    print("\n" + text, flush=True)
    ok = all(v == 0 for v in results["stages"].values())
    log(args.out, f"done: {'all stages ok' if ok else 'some stages failed'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
