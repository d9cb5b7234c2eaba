"""The benchmark's parts; each runs in its own child process and returns a JSON-ready dict.

Every TurboMind request here is greedy with ``ignore_eos`` (see ``fixed_length``): random
weights would otherwise stop at random places, and the two sides of a comparison must do the
same work (``tests/gpu/test_turbomind_engine.py`` checks that ``ignore_eos`` gives exactly
max_new_tokens).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from legal_eagle import gpu_memory, metrics
from legal_eagle.bench import load
from legal_eagle.bench.report import RequestResult, summarise
from legal_eagle.engines.base import Engine, Message, SamplingParams
from legal_eagle.engines.turbomind import KV_BLOCK_TOKENS, kv_bytes_per_token

log = logging.getLogger(__name__)

Part = Callable[[Mapping[str, Any]], dict[str, Any]]
PERSONA = "您是一个专业的律师，用户会对您提出法律方面的问题，请您根据您的知识进行专业、准确的回答。"


def fixed_length_kwargs(params: SamplingParams, stop_ids: Sequence[int]) -> dict[str, Any]:
    """The app's GenerationConfig kwargs plus ``ignore_eos``: every answer runs to max_new_tokens."""
    from legal_eagle.engines.turbomind import generation_kwargs

    return {**generation_kwargs(params, stop_ids), "ignore_eos": True}


@contextlib.contextmanager
def fixed_length() -> Iterator[None]:
    """While active, every ``TurbomindEngine`` answer in this process is exactly max_new_tokens long."""
    from legal_eagle.engines import turbomind as tm

    def build(params: SamplingParams, stop_ids: Sequence[int]) -> Any:
        from lmdeploy import GenerationConfig

        return GenerationConfig(**fixed_length_kwargs(params, stop_ids))

    original = tm.build_generation_config
    tm.build_generation_config = build
    try:
        yield
    finally:
        tm.build_generation_config = original


class PeakMemory:
    """Samples this process's GPU memory (NVML) in a thread; ``peak`` is the largest reading."""

    def __init__(self, baseline_used: int | None, interval_s: float = 0.05) -> None:
        self.baseline_used, self.interval_s = baseline_used, interval_s
        self.peak: int | None = None
        self.source = "n/a"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-peak-memory", daemon=True)

    def now(self) -> int | None:
        """This process's GPU memory now (or the device's growth since the baseline)."""
        used = metrics.gpu_memory_used_by_process()
        if used is not None:
            self.source = "NVML, this process"
            return used
        total = metrics.gpu_used_total()
        if total is not None and self.baseline_used is not None:
            self.source = "NVML, device used minus before loading"
            return total - self.baseline_used
        return None

    def sample(self) -> int | None:
        """Take one reading and fold it into the peak."""
        value = self.now()
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self.sample()


def torch_reserved() -> int | None:
    """Bytes torch's caching allocator holds in this process (None without CUDA in torch)."""
    import torch

    return int(torch.cuda.memory_reserved()) if torch.cuda.is_initialized() else None


def load_peak_holders() -> dict[str, int | None]:
    """Who held GPU memory at the load's peak, by their own high-water marks (sampling misses short
    peaks; these do not): the device's default memory pool (TurboMind's weights and temporaries) and
    torch's caching allocator (LMDeploy reads the checkpoint through torch)."""
    import torch

    pool = gpu_memory.pool_stats()
    return {
        "pool_reserved_high_bytes": pool["reserved_high"] if pool else None,
        "pool_used_high_bytes": pool["used_high"] if pool else None,
        "torch_reserved_high_bytes": int(torch.cuda.max_memory_reserved()) if torch.cuda.is_initialized() else None,
    }


def release_torch_cache() -> dict[str, Any]:
    """Hand torch's cached CUDA blocks back (LMDeploy loads weights through torch); what was held."""
    import torch

    if not torch.cuda.is_initialized():
        return {"torch_reserved_bytes": 0}
    reserved = int(torch.cuda.memory_reserved())
    torch.cuda.empty_cache()
    return {
        "torch_reserved_bytes": reserved,
        "torch_reserved_after_release_bytes": int(torch.cuda.memory_reserved()),
    }


def engine_settings(args: Mapping[str, Any]) -> dict[str, Any]:
    """TurboMind options: the app's defaults (``Settings``), overridden by the part's args."""
    from legal_eagle.config import Settings

    s = Settings()
    keys = ("session_len", "cache_max_entry_count", "quant_policy", "max_batch_size", "enable_prefix_caching",
            "cache_generation")
    out = {k: getattr(s, k) for k in keys}
    out.update({k: args[k] for k in keys if args.get(k) is not None})
    return out


def load_engine(args: Mapping[str, Any], baseline: int | None) -> tuple[Engine, dict[str, Any]]:
    """Load ``args['dir']`` in TurboMind with the app's settings; (engine, what was loaded and how).

    ``args['backend'] == "pytorch"`` (a target-6 experiment) loads LMDeploy's PyTorch engine
    instead, with the same settings, under the same engine wrapper (both share LMDeploy's
    AsyncEngine, which is all the wrapper drives).
    """
    from legal_eagle.engines.turbomind import TurbomindEngine

    opts = engine_settings(args)
    start = time.perf_counter()
    if args.get("backend") == "pytorch":
        engine: Engine = pytorch_engine(Path(args["dir"]), opts)
    else:
        engine = TurbomindEngine.load(
            Path(args["dir"]), model_format=args["format"], tp=1, name=f"bench-{args['format']}",
            extra_options=args.get("options"), **opts
        )
    info = {
        "load_s": time.perf_counter() - start,
        "engine": {**opts, **(args.get("options") or {}), "model_format": args["format"],
                   "backend": args.get("backend", "turbomind")},
        "gpu_used_before_load": baseline,
    }
    return engine, info


def pytorch_engine(model_dir: Path, opts: Mapping[str, Any]) -> Engine:
    """LMDeploy's PyTorch engine on ``model_dir`` (it reads AWQ from the checkpoint's quantization_config)."""
    from lmdeploy import PytorchEngineConfig, pipeline

    from legal_eagle.engines.base import EngineInfo
    from legal_eagle.engines.turbomind import TurbomindEngine

    config = PytorchEngineConfig(session_len=opts["session_len"], cache_max_entry_count=opts["cache_max_entry_count"],
                                 max_batch_size=opts["max_batch_size"], quant_policy=opts["quant_policy"],
                                 enable_prefix_caching=opts["enable_prefix_caching"])
    pipe = pipeline(str(model_dir), backend_config=config, log_level="WARNING")
    info = EngineInfo(name="bench-pytorch", backend="pytorch", model_path=str(model_dir), model_format="auto",
                      quantization="as the checkpoint says", context_len=opts["session_len"])
    return TurbomindEngine(pipe, info)


def params_of(args: Mapping[str, Any], key: str = "max_new_tokens") -> SamplingParams:
    """Greedy sampling with the part's fixed answer length."""
    return SamplingParams(
        max_new_tokens=int(args[key]), temperature=0.7, top_p=0.8, repetition_penalty=1.0, greedy=True
    )


def questions() -> list[str]:
    """The app's example questions (the same list on every side)."""
    from legal_eagle.prompts import load_prompts

    return list(load_prompts().examples) or ["公司拖欠工资怎么办？"]


def pipe_level(engine: Engine, qs: Sequence[str], params: SamplingParams, requests: int) -> dict[str, Any]:
    """LMDeploy's own ``pipe.stream_infer`` (its chat template, no app code), one user."""
    from lmdeploy import GenerationConfig

    pipe = engine._pipe  # type: ignore[attr-defined]  # the bench looks one level under the engine
    gen = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=False,
        ignore_eos=True,
    )
    results = []
    for r in range(requests):
        messages: list[Message] = [
            {"role": "system", "content": PERSONA},
            {"role": "user", "content": qs[r % len(qs)]},
        ]
        trace = load.Trace()
        session = pipe.session()
        try:
            for out in pipe.stream_infer(list(messages), sessions=session, gen_config=gen):
                trace.record(int(out.generate_token_len or 0))
        finally:
            with contextlib.suppress(Exception):
                pipe.session_mgr.remove(session)
        results.append(trace.result(0))
    return summarise(results, 1)


def part_serve(args: Mapping[str, Any]) -> dict[str, Any]:
    """Raw engine vs the app (and LMDeploy's pipe) at each load level; memory; 8 long chats."""
    from legal_eagle.bench.child import process_consumers
    from legal_eagle.config import Settings

    baseline = metrics.gpu_used_total()
    engine, result = load_engine(args, baseline)
    mem = PeakMemory(baseline)
    result["memory_bytes"] = mem.sample()
    result["torch_reserved_bytes"] = torch_reserved()
    levels = [int(u) for u in args["levels"]]
    rounds = {1: int(args["requests_1user"]), **{u: int(args["rounds"]) for u in levels if u != 1}}
    settings = Settings(
        host="127.0.0.1",
        port=load.free_port(),
        session_len=result["engine"]["session_len"],
        concurrency_limit=int(args.get("concurrency_limit") or Settings().concurrency_limit),
    )
    result["settings"] = {
        "concurrency_limit": settings.concurrency_limit,
        "max_new_tokens": args["max_new_tokens"],
        "consumers": args.get("consumers", "process"),
    }
    params, qs = params_of(args), questions()
    in_process = args.get("consumers", "process") != "process"
    consumers = load.app_level_results if in_process else process_consumers
    page = load.page_level_results if in_process else functools.partial(process_consumers, kind="page")
    with mem, fixed_length():
        result.update(
            load.compare(
                engine,
                settings,
                questions=qs,
                persona=PERSONA,
                params=params,
                levels=levels,
                rounds=rounds,
                app=bool(args.get("app", True)),
                consumers=consumers,
                page=page,
            )
        )
        if args.get("pipe"):
            try:
                result["pipe"] = {"1": pipe_level(engine, qs, params, int(args["requests_1user"]))}
            except Exception as exc:
                log.warning("pipe side failed: %r", exc)
                result["pipe_error"] = repr(exc)
        if args.get("long8"):
            long_params = params_of(args, "long_new_tokens")
            prompt = min(
                int(args["long_prompt_tokens"]),
                result["engine"]["session_len"] - long_params.max_new_tokens - 64,
            )
            result["long8"], result["long8_prompt_tokens"] = load.long_chats(
                engine, PERSONA, 8, prompt, long_params
            )
    result.update(peak_bytes=mem.peak, memory_source=mem.source)
    engine.close()
    return result


def next_turn_ids(tokenizer: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int], question: str) -> list[int]:
    """The next turn's prompt ids when the engine's own answer ids stay in the history.

    Equal to ``render_ids`` of the conversation whenever the answer's text tokenizes back to the
    ids the model generated (a real model's text does; a random model's byte tokens may not).
    """
    from legal_eagle.chat_template import IM_END, encode_text, render_ids, special_id

    tail = render_ids(tokenizer, [{"role": "user", "content": question}])[1:]  # no second BOS
    return [*prompt_ids, *answer_ids, special_id(tokenizer, IM_END), *encode_text(tokenizer, "\n"), *tail]


def ids_request(engine: Any, input_ids: Sequence[int], params: SamplingParams,
                timeout_s: float = 300.0) -> dict[str, Any]:
    """One answer from prompt ids through LMDeploy's AsyncEngine under a ``TurbomindEngine``.

    Returns:
        ``ttft_s`` (first output carrying tokens), the generated ``ids`` and ``cached_tokens``
        (prompt tokens TurboMind's prefix cache supplied, as LMDeploy reports them).
    """
    import asyncio

    from legal_eagle.engines import turbomind as tm

    core = engine._pipe.async_engine  # the bench looks one level under the engine
    gen = tm.build_generation_config(params, engine._stop_ids)

    async def run() -> dict[str, Any]:
        session = core.session_mgr.get()
        start, first, ids, cached = time.perf_counter(), None, [], 0
        try:
            request = await core.preprocess(None, session, gen_config=gen, input_ids=list(input_ids))
            async with contextlib.aclosing(core.generate(request, stream_response=True)) as outputs:
                async for out in outputs:
                    n = int(out.generate_token_len or 0)
                    if n and first is None:
                        first = time.perf_counter() - start
                    new = list(out.token_ids or [])  # the ids since the detokenizer's offset, to the end
                    at = n - len(new)
                    ids[max(at, 0):] = new[max(-at, 0):]
                    cached = max(cached, int(getattr(out, "cached_tokens", 0) or 0))
        finally:
            with contextlib.suppress(Exception):
                core.session_mgr.remove(session)
        return {"ttft_s": first, "ids": ids, "cached_tokens": cached}

    return asyncio.run_coroutine_threadsafe(run(), engine._loop).result(timeout_s)


def own_answer_chat(engine: Any, persona: str, turns: int, question_tokens: int, answer_tokens: int,
                    seed: int = 0) -> list[dict[str, Any]]:
    """A chat whose history holds the engine's own answers (as ids), as the app's does with a real model.

    Each turn generates ``answer_tokens`` tokens; the next prompt is this prompt, that answer and
    the next question, so TurboMind may reuse the answer's cached blocks (``cache_generation``).
    """
    from legal_eagle.chat_template import render_ids

    tokenizer = engine._tokenizer
    out: list[dict[str, Any]] = []
    ids: list[int] = []
    answer: list[int] = []
    for k in range(turns):
        question = load.fit_text(engine, question_tokens, offset=7 * k + seed, tag=f"第{k + 1}个问题（会话{seed}）：")
        ids = (render_ids(tokenizer, load.build_messages(persona, [], question)) if k == 0
               else next_turn_ids(tokenizer, ids, answer, question))
        r = ids_request(engine, ids, SamplingParams(max_new_tokens=answer_tokens, greedy=True))
        answer = r["ids"]
        out.append({"turn": k + 1, "prompt_tokens": len(ids), "cached_tokens": r["cached_tokens"],
                    "ttft_ms": None if r["ttft_s"] is None else r["ttft_s"] * 1000})
    return out


def part_prefix(args: Mapping[str, Any]) -> dict[str, Any]:
    """Time to first token per turn over a growing chat; the median over a few chats per turn."""
    baseline = metrics.gpu_used_total()
    engine, result = load_engine(args, baseline)
    result["memory_bytes"] = PeakMemory(baseline).sample()
    params = params_of(args)
    with fixed_length():
        load.engine_request(engine, load.build_messages(PERSONA, [], "你好"), params)  # warm-up
        runs = []
        for seed in range(int(args["conversations"])):
            prompts = load.conversation(
                engine,
                PERSONA,
                int(args["turns"]),
                int(args["question_tokens"]),
                int(args["answer_tokens"]),
                seed=seed + 1,
            )
            runs.append(load.chat_ttfts(engine, prompts, params))
    turns = []
    for k in range(len(runs[0])):
        values = [run[k]["ttft_ms"] for run in runs if run[k]["ttft_ms"] is not None]
        turns.append(
            {
                "turn": k + 1,
                "prompt_tokens": runs[0][k]["prompt_tokens"],
                "ttft_ms": statistics.median(values) if values else None,
            }
        )
    result["turns"], result["runs"] = turns, runs
    if args.get("own_answers"):
        with fixed_length():
            result["own_turns"] = own_answer_chat(engine, PERSONA, int(args["turns"]), int(args["question_tokens"]),
                                                  int(args["answer_tokens"]), seed=99)
    engine.close()
    return result


def kv_blocks(chats: int, session_len: int) -> int:
    """KV-cache blocks for ``chats`` full sessions of ``session_len`` tokens."""
    return chats * -(-session_len // KV_BLOCK_TOKENS)


def kv_share(kv_bytes: int, free_bytes: int, weights_bytes: int, overhead_bytes: int = 2 * 1024**3) -> float:
    """``cache_max_entry_count`` that gives about ``kv_bytes`` of KV cache.

    LMDeploy 0.18's TurboMind takes the share of the memory left free after the weights (a
    count of blocks above 1 is refused: "object-cache path no longer accepts
    cache_max_block_count as a block count", TurboMind aborts the process).
    """
    left = free_bytes - weights_bytes - overhead_bytes
    if left <= kv_bytes:
        raise ValueError(f"{kv_bytes} bytes of KV cache do not fit the {max(left, 0)} bytes left after the weights")
    return min(0.95, max(0.001, kv_bytes / left))


def cuda_context_bytes(mem: PeakMemory) -> int | None:
    """This process's GPU memory once torch has made its CUDA context (and one tiny tensor): the share
    of a serving process that no engine setting changes."""
    import torch

    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    return mem.now()


def part_kv8g(args: Mapping[str, Any]) -> dict[str, Any]:
    """Target 4: the 4-bit engine sized for exactly 8 chats x session_len, its peak memory and speed."""
    from lmdeploy import TurbomindEngineConfig, pipeline

    from legal_eagle.engines.base import EngineInfo
    from legal_eagle.engines.turbomind import TurbomindEngine
    from legal_eagle.planner import weights_bytes

    chats, session_len = int(args["chats"]), int(args["session_len"])
    blocks = kv_blocks(chats, session_len)
    kv_bytes = blocks * KV_BLOCK_TOKENS * kv_bytes_per_token(Path(args["dir"]), int(args["quant_policy"]))
    free_total = metrics.gpu_free_total()
    if free_total is None:
        raise RuntimeError("NVML reports no GPU: the KV-cache share cannot be sized")
    share = kv_share(kv_bytes, free_total[0], weights_bytes(Path(args["dir"])))
    opts = {
        "model_format": "awq",
        "session_len": session_len,
        "cache_max_entry_count": share,
        "quant_policy": int(args["quant_policy"]),
        "max_batch_size": chats,
        "enable_prefix_caching": True,
        "max_prefill_token_num": int(args.get("max_prefill_token_num", 4096)),
    }
    if args.get("cache_generation"):
        opts["cache_generation"] = str(args["cache_generation"])
    if args.get("cache_chunk_size"):
        opts["cache_chunk_size"] = int(args["cache_chunk_size"])
    baseline = metrics.gpu_used_total()
    mem = PeakMemory(baseline)
    context = cuda_context_bytes(mem)
    knobs: dict[str, Any] = {}
    if args.get("env"):
        knobs["env"] = dict(args["env"])
    if args.get("stack_limit"):
        import lmdeploy.turbomind  # noqa: F401  (loads the CUDA 12 runtime the limit is set through)

        knobs["stack_limit"] = gpu_memory.set_stack_limit(int(args["stack_limit"]))
    start = time.perf_counter()
    with mem:
        if args.get("app_load"):  # the app's own load: lean_memory and the GEMM tuning file in app_load
            engine = TurbomindEngine.load(
                Path(args["dir"]), tp=1, name="bench-kv8g", check_memory=False, gemm_tuning_dir=Path(args["app_load"]),
                extra_options={"max_prefill_token_num": opts["max_prefill_token_num"]},
                **{k: v for k, v in opts.items() if k != "max_prefill_token_num"},
            )
            load_s = time.perf_counter() - start
            kept = ("cuda_stack_limit", "trimmed_default_pool", "gemm_tuning", "gemm_tuning_file", "cache_generation")
            knobs.update({k: engine.info.extra.get(k) for k in kept})
        else:
            pipe = pipeline(str(args["dir"]), backend_config=TurbomindEngineConfig(**opts), log_level="WARNING")
            load_s = time.perf_counter() - start
            if args.get("trim_pools"):
                knobs["trimmed_default_pool"] = gpu_memory.trim_default_pool()
            info = EngineInfo(
                name="bench-kv8g",
                backend="turbomind",
                model_path=str(args["dir"]),
                model_format="awq",
                quantization="AWQ",
                context_len=session_len,
            )
            engine = TurbomindEngine(pipe, info)
        after_load = mem.sample()
        load_peak = mem.peak
        holders = load_peak_holders()
        cache = release_torch_cache()
        after_release = mem.sample()
        mem.peak = after_release  # from here on: the serving peak
        params = params_of(args, "long_new_tokens")
        with fixed_length():
            load.engine_request(
                engine, load.build_messages(PERSONA, [], "你好"), replace(params, max_new_tokens=8)
            )
            prompt = session_len - params.max_new_tokens - 64
            long8, prompt_tokens = load.long_chats(engine, PERSONA, chats, prompt, params)
    engine.close()
    return {
        "engine": {**opts, "cache_max_entry_count": f"{share:.4f} ({blocks} blocks, {kv_bytes / 2**30:.2f} GiB)",
                   **knobs},
        "load_s": load_s,
        "memory_bytes": after_load,
        "load_peak_bytes": load_peak,
        "memory_after_torch_release_bytes": after_release,
        "serving_peak_bytes": mem.peak,
        "peak_bytes": max((v for v in (load_peak, mem.peak) if v is not None), default=None),
        "memory_source": mem.source,
        **holders,
        "cuda_context_bytes": context,
        "weights_bytes": weights_bytes(Path(args["dir"])),
        **cache,
        "long8": long8,
        "long8_prompt_tokens": prompt_tokens,
        "kv_tokens": blocks * KV_BLOCK_TOKENS,
    }


def part_tune(args: Mapping[str, Any]) -> dict[str, Any]:
    """One target-6 variant (its env was set by the parent): batch-1 decode speed."""
    baseline = metrics.gpu_used_total()
    engine, result = load_engine(args, baseline)
    params = params_of(args)
    with fixed_length():
        load.engine_request(
            engine, load.build_messages(PERSONA, [], "你好"), replace(params, max_new_tokens=8)
        )
        runs = [
            load.engine_request(engine, load.build_messages(PERSONA, [], q), params)
            for q in questions()[: int(args["requests"])]
        ]
    s = summarise(runs, 1)
    engine.close()
    return {
        "name": args["name"],
        "model_format": args["format"],
        "backend": result["engine"].get("backend", "turbomind"),
        "dir": args["dir"],
        "max_batch_size": result["engine"]["max_batch_size"],
        "quant_policy": result["engine"]["quant_policy"],
        "env": args.get("env", {}),
        "options": args.get("options", {}),
        "load_s": result["load_s"],
        "decode_tok_s": s["decode_tok_s_mean"],
        "ttft_ms": s["ttft_ms_mean"],
    }


def part_consumers(args: Mapping[str, Any]) -> dict[str, Any]:
    """The app's users (gradio_client, or the page's protocol), run apart from the app's process."""
    import os

    from legal_eagle.bench.child import wait_for_go

    params = SamplingParams(**args["params"])
    runner = load.page_level_results if args.get("kind") == "page" else load.app_level_results
    trace = os.environ.get("LE_BENCH_TRACE_HTTP") == "1"  # where a client's time to first token goes
    if trace:
        logging.getLogger(load.__name__).setLevel(logging.DEBUG)
    with load.http_timeline(lambda line: log.info("trace %s", line)) if trace else contextlib.nullcontext():
        results: list[RequestResult] = runner(
            args["url"], args["questions"], args["persona"], params, int(args["users"]), int(args["rounds"]),
            first_user=int(args.get("first_user", 0)), gate=wait_for_go if args.get("gate") else None,
        )
    return {"results": [r.as_dict() for r in results]}


def part_selftest(args: Mapping[str, Any]) -> dict[str, Any]:
    """Echo for tests of the child-process plumbing."""
    import os

    return {"ok": True, "echo": args.get("echo"), "probe": os.environ.get("LE_BENCH_PROBE")}


def parts() -> dict[str, Part]:
    """Every part by name (the start-up parts live in ``bench.start``)."""
    from legal_eagle.bench import start

    return {
        "serve": part_serve,
        "prefix": part_prefix,
        "kv8g": part_kv8g,
        "tune": part_tune,
        "consumers": part_consumers,
        "selftest": part_selftest,
        "make_random": start.part_make_random,
        "quick_awq": start.part_quick_awq,
        "make_fp8": start.part_make_fp8,
        "cold": start.part_cold,
        "warm": start.part_warm,
    }
