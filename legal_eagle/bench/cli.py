"""``python -m legal_eagle.bench``: run the parts in child processes, print the table, write markdown.

Each GPU part runs as ``python -m legal_eagle.bench --part NAME`` in its own process (one
engine per process) and hands back JSON; this parent never touches the GPU itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from legal_eagle.bench.child import run_child
from legal_eagle.bench.markdown import render_markdown, write_section

log = logging.getLogger(__name__)

ALL_PARTS = ("cold", "serve", "fp16", "prefix", "kv8g", "warm", "tune")
DEFAULT_PARTS = "cold,serve,fp16,prefix,kv8g,warm"
# TM_GEMM_TUNE keys (TurboMind's gemm tuner): max_splits, max_waves, top_k (0: every kernel), clusters,
# min_iter, max_iter, max_time; TM_GEMM_EXPORT/IMPORT write/read the tuned dispatch cache.
_FULL_SEARCH = "top_k=0,clusters=0,min_iter=2,max_iter=10,max_time=0.5"
# Target 4 (8 chats x 4k in 8 GiB): what else than the KV format and the prefill size moves TurboMind's memory.
# "{work}" is the bench's work dir. TurboMind keeps GEMM tuning in a file with TM_GEMM_EXPORT and skips its warm-up
# (tuning runs, an L2-flush buffer, the kernels it tries) when it reads one with TM_GEMM_IMPORT; "trim" hands the
# free part of the device's default memory pool back after the load (the weights' repacking temporaries);
# "stack512" lowers the per-thread CUDA stack (local memory is reserved as stack x resident threads) before it.
_LEAN: dict[str, Any] = {"env": {"TM_GEMM_IMPORT": "{work}/gemm-kv8g.cache"}, "trim_pools": True, "stack_limit": 512}
KV_VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "export": {"env": {"TM_GEMM_EXPORT": "{work}/gemm-kv8g.cache", "TM_LOG_LEVEL": "INFO"}},
    "import": {"env": {"TM_GEMM_IMPORT": "{work}/gemm-kv8g.cache"}},
    "trim": {"trim_pools": True},
    "stack512": {"stack_limit": 512},
    "app-lean": {"trim_pools": True, "stack_limit": 512},  # what TurbomindEngine.load does (lean_memory)
    "lean": _LEAN,
    # TurbomindEngine.load itself, as the app calls it: lean_memory and its GEMM tuning file, which the first of
    # the two runs writes into {work}/gemm-app (tuning) and the second reads (no warm-up): a first and a later start.
    "app": {"app_load": "{work}/gemm-app"},
    "app-again": {"app_load": "{work}/gemm-app"},
    # `lean` with the app's cache_generation "all" (the prefix cache also indexes a partly filled last block).
    "lean-all": {**_LEAN, "cache_generation": "all"},
    # `lean` with torch's caching allocator off (every free goes back to CUDA): does torch's cache, 2.13 GiB at most
    # while LMDeploy reads the checkpoint, make the load's peak? No (H200, 2026-12-06): the peak less the pool's
    # reservation was 1,994 MB with and without it; the peaks differed only by what the pool reserved.
    "lean-nocache": {**_LEAN, "env": {**_LEAN["env"], "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}},
    # `lean` with TurboMind's KV cache taken in chunks of 64 blocks as chats need them (cache_chunk_size; -1, the
    # default, takes it all at the load): does the load's peak then stay below serving's?
    "lean-chunk": {**_LEAN, "cache_chunk_size": 64},
}
TUNE_VARIANTS: dict[str, dict[str, Any]] = {
    "app-default": {},
    "mbs1": {"max_batch_size": 1},
    "kv-int8": {"quant_policy": 8},
    "tune-full": {
        "max_batch_size": 1,
        "env": {"TM_GEMM_TUNE": _FULL_SEARCH, "TM_GEMM_EXPORT": "{work}/gemm-cache.bin"},
    },
    "tune-splits": {
        "max_batch_size": 1,
        "env": {"TM_GEMM_TUNE": "max_splits=16,max_waves=32," + _FULL_SEARCH},
    },
    "import-cache": {"env": {"TM_GEMM_IMPORT": "{work}/gemm-cache.bin"}},  # the app's batch size, tuned plans
    # TM_GEMM_WEIGHT_PACK (TurboMind 0.18's GEMM weight-plan debug knob): 0 forces the plain (source-
    # preserving) kernel families, 1 the packed ones; unset lets TurboMind pick (the SM90 packed family).
    "pack-plain": {"env": {"TM_GEMM_WEIGHT_PACK": "0"}},
    "pack-forced": {"env": {"TM_GEMM_WEIGHT_PACK": "1"}},
    # gemm_input_dtype: TurbomindEngineConfig's preferred GEMM input type; float8_e4m3 puts kernel
    # families with FP8 activations first where one is registered for the weight type.
    "fp8-input": {"options": {"gemm_input_dtype": "float8_e4m3"}},
    "fp16-fp8-input": {"format": "hf", "options": {"gemm_input_dtype": "float8_e4m3"}},
    "fp8": {"format": "fp8"},  # blocked FP8 weights (8-bit, made in WORK_DIR/fp8 when absent)
    "fp16": {"format": "hf"},
    "g64": {"group_size": 64},  # AWQ with 64-wide groups (data-free, made in WORK_DIR/awq-g64 when absent)
    "pytorch-awq": {"backend": "pytorch"},  # LMDeploy's PyTorch engine on the same AWQ checkpoint
    "pytorch-fp16": {"backend": "pytorch", "format": "hf"},
}
KV8G_SESSION = 4096  # "8 chats of 4k tokens": each chat's prompt + answer fills one 4096-token session
KV8G_PREFILL = 4096  # max_prefill_token_num of the 8-chat engine: one whole prompt per prefill step
VERSIONED = ("lmdeploy", "torch", "transformers", "gradio", "gradio_client")


def variant_spec(variant: dict[str, Any], work: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A KV or tune variant's part arguments and its environment, ``{work}`` filled in."""
    spec = dict(variant)
    if "app_load" in spec:
        spec["app_load"] = spec["app_load"].format(work=work)
    return spec, {k: v.format(work=work) for k, v in spec.pop("env", {}).items()}


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options."""
    p = argparse.ArgumentParser(
        prog="python -m legal_eagle.bench",
        description=(
            "Raw TurboMind vs the running Legal-Eagle app, side by side, plus prefix caching, memory, "
            "start-up times and 4-bit decode experiments. Needs an NVIDIA GPU with LMDeploy TurboMind."
        ),
    )
    p.add_argument("--model-dir", type=Path, help="fp16 checkpoint (InternLM2 or Llama format)")
    p.add_argument(
        "--awq-dir",
        type=Path,
        help="4-bit AWQ checkpoint; made there when absent "
        "(by the cold part, else by a quick data-free AWQ) [default: WORK_DIR/awq]",
    )
    p.add_argument(
        "--make-random-7b",
        type=Path,
        metavar="DIR",
        help="first write RANDOM weights in "
        "InternLM2-chat-7B's shape to DIR (kept if DIR already has them) and use them as --model-dir",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/tmp/legal-eagle-bench"),
        help="converted and quantized checkpoints go here (tens of GB for a 7B model)",
    )
    p.add_argument(
        "--parts",
        default=DEFAULT_PARTS,
        help=f"comma list of {','.join(ALL_PARTS)} "
        f"[default: {DEFAULT_PARTS}; tune is an extra run of its own]",
    )
    p.add_argument("--quick", action="store_true", help="fewer requests per level (a whole run in minutes)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="fixed answer length of every request")
    p.add_argument("--users", default="1,8,32", help="simultaneous users per load level")
    p.add_argument("--concurrency-limit", type=int, help="the app's concurrency_limit [default: the app's]")
    p.add_argument(
        "--kv-policies",
        help="KV quant_policy values tried for 8 chats x 4k in 8 GiB [default: 8 with --quick, else 8,4]",
    )
    p.add_argument(
        "--kv-prefill",
        default=str(KV8G_PREFILL),
        help="TurboMind max_prefill_token_num values tried for 8 chats x 4k (its buffers scale with it) "
        f"[default: {KV8G_PREFILL}]",
    )
    p.add_argument(
        "--kv-variants",
        default="plain",
        help=f"memory variants tried for 8 chats x 4k (of {','.join(KV_VARIANTS)}; export before import) "
        "[default: plain]",
    )
    p.add_argument(
        "--calib-samples", type=int, help="AWQ calibration chunks in the cold part [default: the app's]"
    )
    p.add_argument(
        "--tune-variants",
        default=",".join(TUNE_VARIANTS),
        help=f"target-6 variants to run (of {','.join(TUNE_VARIANTS)})",
    )
    p.add_argument(
        "--consumers",
        choices=("process", "thread"),
        default="process",
        help="where the app's gradio_client users run (process: apart from the app's GIL)",
    )
    p.add_argument("--out", type=Path, help="write (or update the bench section of) this markdown file")
    p.add_argument("--json", type=Path, help="also write the raw results as JSON")
    p.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="no GPU: merge earlier --json files and print/write their report",
    )
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--part-args", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    return p


def child_main(part: str, part_args: str, result_file: Path) -> int:
    """Run one part in this (child) process and write its JSON; exits hard so TurboMind's exit cannot hang."""
    from legal_eagle.bench.parts import parts

    code = 0
    try:
        result = parts()[part](json.loads(part_args))
    except BaseException as exc:  # SystemExit from LMDeploy included: the parent must get a reason
        log.error("part %s failed: %s", part, traceback.format_exc())
        result, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
    result_file.write_text(json.dumps(result, ensure_ascii=False, default=str), encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=20, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(argv: Sequence[str]) -> dict[str, Any]:
    """GPU name and driver (nvidia-smi), package versions, the exact command, date and commit."""
    gpu = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    name, driver, total = (
        [*(x.strip() for x in gpu.splitlines()[0].split(",")), "", "", ""][:3] if gpu else ("n/a", "n/a", "")
    )
    versions = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "gpu": f"{name} ({total})" if total else name,
        "driver": driver,
        "cpu": f"{os.cpu_count()} CPU cores",
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m legal_eagle.bench " + shlex.join(argv),
        "commit": _run(["git", "rev-parse", "--short", "HEAD"]) or "n/a",
    }


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes of the run (--quick makes them smaller)."""
    quick = args.quick
    return {
        "requests_1user": 3 if quick else 5,
        "rounds": 1 if quick else 2,
        "conversations": 1 if quick else 3,
        "long_new_tokens": 128 if quick else 256,
        "kv_policies": [int(x) for x in (args.kv_policies or ("8" if quick else "8,4")).split(",")],
        "tune_requests": 2 if quick else 4,
    }


def fp16_dir(model_dir: Path, work: Path) -> Path:
    """The fp16 checkpoint as the app serves it: the Llama conversion in ``work`` when there is one."""
    marker = work / "llama" / "legal_eagle_conversion.json"
    if marker.is_file():
        source = json.loads(marker.read_text(encoding="utf-8")).get("source")
        if source == str(Path(model_dir).resolve()):
            return work / "llama"
    return Path(model_dir)


def run_parts(
    args: argparse.Namespace,
    parts: set[str],
    notes: list[str],
    on_progress: Callable[[dict[str, Any]], None] = lambda results: None,
) -> dict[str, Any]:
    """Run the chosen parts in order, one child process each; part name -> result.

    ``on_progress(results)`` runs after every part, so a run cut short still leaves its figures.
    """
    results: dict[str, Any] = {}

    def step(key: str, part: str, part_args: dict[str, Any], timeout_s: float,
             env: dict[str, str] | None = None) -> dict[str, Any]:
        results[key] = run_child(part, part_args, timeout_s=timeout_s, env=env)
        on_progress(results)
        return results[key]

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir
    if args.make_random_7b:
        if step("make_random", "make_random", {"dir": str(args.make_random_7b)}, 420).get("error"):
            return results
        model_dir = args.make_random_7b
        notes.append(
            "Model: RANDOM weights in InternLM2-chat-7B's shape (speed and memory as the real model; "
            "answers meaningless)."
        )
    if model_dir is None:
        raise SystemExit("give --model-dir or --make-random-7b")
    size, common = plan(args), {"max_new_tokens": args.max_new_tokens}
    awq_dir = (args.awq_dir or work / "awq").resolve()
    awq_ready = (awq_dir / "config.json").is_file()
    if "cold" in parts:
        out_dir = work / "cold-awq" if awq_ready else awq_dir
        cold_args = {
            "dir": str(model_dir),
            "work_dir": str(work),
            "out_dir": str(out_dir),
            "calib_samples": args.calib_samples,
        }
        awq_ready = not step("cold", "cold", cold_args, 540).get("error") or awq_ready
    if parts & {"serve", "prefix", "kv8g", "warm", "tune"} and not awq_ready:
        quick_args = {"dir": str(model_dir), "work_dir": str(work), "awq_dir": str(awq_dir)}
        method = step("quick_awq", "quick_awq", quick_args, 480).get("method", "failed")
        notes.append(
            f"4-bit weights for the speed parts: {method} (same kernels and memory as the app's AWQ)."
        )
    awq = {"format": "awq", "dir": str(awq_dir)}
    if "serve" in parts:
        serve_args = {
            **awq,
            **common,
            "levels": [int(u) for u in args.users.split(",")],
            "requests_1user": size["requests_1user"],
            "rounds": size["rounds"],
            "app": True,
            "pipe": True,
            "long8": True,
            "long_new_tokens": size["long_new_tokens"],
            "long_prompt_tokens": KV8G_SESSION - size["long_new_tokens"] - 64,
            "concurrency_limit": args.concurrency_limit,
            "consumers": args.consumers,
        }
        step("serve_awq", "serve", serve_args, 480)
    if "fp16" in parts:
        fp16_args = {
            "format": "hf",
            "dir": str(fp16_dir(model_dir, work)),
            **common,
            "levels": [1, 32],
            "requests_1user": size["requests_1user"],
            "rounds": 1,
            "app": False,
        }
        step("serve_hf", "serve", fp16_args, 300)
    if "prefix" in parts:
        # the app's settings (cache_generation "all"), LMDeploy's default "auto" (whole answer blocks only), off
        for key, on, generation in (("prefix_on", True, None), ("prefix_on_auto", True, "auto"),
                                    ("prefix_off", False, None)):
            prefix_args = {
                **awq,
                "max_new_tokens": 16,
                "enable_prefix_caching": on,
                "cache_generation": generation,
                "turns": 10,
                "question_tokens": 150,
                "answer_tokens": 250,
                "conversations": size["conversations"],
                "own_answers": on,  # also a chat that keeps the engine's own answers (the app's case)
            }
            step(key, "prefix", prefix_args, 300)
    if "kv8g" in parts:
        for qp in size["kv_policies"]:
            for prefill in (int(x) for x in args.kv_prefill.split(",")):
                for variant in args.kv_variants.split(","):
                    spec, env = variant_spec(KV_VARIANTS[variant], work)
                    kv_args = {
                        **awq,
                        "chats": 8,
                        "session_len": KV8G_SESSION,
                        "quant_policy": qp,
                        "max_prefill_token_num": prefill,
                        "long_new_tokens": size["long_new_tokens"],
                        **spec,
                        **({"env": env} if env else {}),
                    }
                    key = (f"kv8g_q{qp}" + ("" if prefill == KV8G_PREFILL else f"_p{prefill}")
                           + ("" if variant == "plain" else f"_{variant}"))
                    step(key, "kv8g", kv_args, 300, env=env or None)
    if "warm" in parts:
        step("warm", "warm", {"awq_dir": str(awq_dir)}, 180)
        notes.append(
            "Warm start reads weights the OS has probably cached (they were just written or loaded)."
        )
    if "tune" in parts:
        variants: list[dict[str, Any]] = []
        results["tune"] = {"variants": variants}
        for name in args.tune_variants.split(","):
            spec, env = variant_spec(TUNE_VARIANTS[name], work)
            fmt = spec.pop("format", "awq")
            weights = awq_dir if fmt == "awq" else fp16_dir(model_dir, work)
            if fmt == "fp8":  # 8-bit weights: written once from the fp16 Llama checkpoint, kept in the work dir
                weights = work / "fp8"
                if not (weights / "config.json").is_file():
                    step("make_fp8", "make_fp8", {"dir": str(fp16_dir(model_dir, work)), "fp8_dir": str(weights)},
                         300)
            group = spec.pop("group_size", None)
            if group is not None:  # other AWQ weights: made once, kept in the work dir
                weights = work / f"awq-g{group}"
                if not (weights / "config.json").is_file():
                    step(f"quick_awq_g{group}", "quick_awq", {"dir": str(model_dir), "work_dir": str(work),
                                                             "awq_dir": str(weights), "group_size": group}, 480)
            tune_args = {
                "name": name,
                "format": fmt,
                "env": env,
                "requests": size["tune_requests"],
                **common,
                "dir": str(weights),
                **spec,
            }
            variants.append(
                {**run_child("tune", tune_args, timeout_s=240, env=env), "name": name, "env": env}
            )
            on_progress(results)
    return results


def save(results: dict[str, Any], meta: dict[str, Any], args: argparse.Namespace) -> None:
    """Write the JSON and markdown where asked (after every part, and at the end)."""
    if args.out:
        write_section(args.out, render_markdown(results, meta))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"meta": meta, "results": results}, ensure_ascii=False, indent=1, default=str)
        args.json.write_text(text, encoding="utf-8")


def emit(results: dict[str, Any], meta: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the report; write the markdown and JSON where asked."""
    print(render_markdown(results, meta))
    save(results, meta, args)
    if args.out:
        print(f"report written to {args.out}", file=sys.stderr)


def merge_reports(paths: Sequence[Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Results of several --json files (later files win per part) and one meta for them."""
    results: dict[str, Any] = {}
    metas = []
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        results.update(data["results"])
        metas.append(data["meta"])
    meta = dict(metas[0])
    if len(metas) > 1:
        meta["command"] = "` + `".join(m["command"] for m in metas)
        meta["notes"] = list(dict.fromkeys(n for m in metas for n in m.get("notes", [])))
    return results, meta


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.part:
        return child_main(args.part, args.part_args or "{}", args.result_file)
    if args.report:
        results, meta = merge_reports(args.report)
        emit(results, meta, args)
        return 0
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - set(ALL_PARTS)
    unknown |= set(args.tune_variants.split(",")) - set(TUNE_VARIANTS)
    unknown |= set(args.kv_variants.split(",")) - set(KV_VARIANTS)
    if unknown:
        print(
            f"unknown part or variant: {sorted(unknown)}; parts {ALL_PARTS}, --tune-variants {list(TUNE_VARIANTS)}, "
            f"--kv-variants {list(KV_VARIANTS)}",
            file=sys.stderr,
        )
        return 2
    meta = machine_info(argv)
    meta["notes"] = [
        f"Every request greedy, ignore_eos, exactly {args.max_new_tokens} new tokens (prefix: 16; "
        "8 chats: see table); app settings = legal_eagle.config.Settings defaults."
    ]
    if args.quick:
        meta["notes"].append("--quick: fewer requests per level.")
    start = time.monotonic()
    meta["model"] = str(args.make_random_7b or args.model_dir)
    results = run_parts(args, parts, meta["notes"], lambda r: save(r, meta, args))
    meta["notes"].append(f"Whole run: {time.monotonic() - start:.0f} s.")
    emit(results, meta, args)
    return 0
