"""Helpers of the GPU tests (no fixtures here): TurboMind's idle check, the tiny shape, a token-id probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# TurboMind wants head_dim 128 and sizes that are multiples of the AWQ group (128).
TINY_SHAPE = {"hidden_size": 512, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 1024}


def engine_idle(engine: Any) -> bool:
    """TurboMind's own view: no request holds a handle and the scheduler has no sequence."""
    core = engine._pipe.async_engine
    metrics = core.engine.get_schedule_metrics()
    return core.session_mgr.request_handle_pool.num_dispatched == 0 and metrics.active_seqs == 0


def tiny_fp16(tmp_path_factory: Any, name: str) -> Path:
    """A tiny RANDOM fp16 checkpoint in InternLM2 format, built on the GPU."""
    from legal_eagle.tiny_model import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp(name) / "internlm2-fp16", device="cuda", **TINY_SHAPE)


def generated_ids(engine: Any, messages: Any, params: Any) -> list[int]:
    """The token ids of one answer, for comparisons that its text cannot make.

    A random model emits byte tokens that are not valid UTF-8, and how LMDeploy's incremental
    detokenizer writes them (U+FFFD, and sometimes the character after them) depends on where the
    stream's chunks split: on the H200 two greedy runs gave "…提IH…" and "…提I…" from the same
    tokens. LMDeploy hands the detokenizer the whole sequence so far (prompt + answer) on every
    step; the last one seen, less the prompt, is the answer.
    """
    tokenizer = engine._pipe.async_engine.tokenizer
    original = tokenizer.detokenize_incrementally
    seen: list[list[int]] = []

    def record(all_ids: Any, state: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(list(all_ids))
        return original(all_ids, state, *args, **kwargs)

    prompt = engine.count_tokens(messages)
    tokenizer.detokenize_incrementally = record
    try:
        chunks = list(engine.stream(messages, params))
    finally:
        del tokenizer.detokenize_incrementally
    ids = seen[-1][prompt:] if seen else []
    assert len(ids) == chunks[-1].n_tokens, (len(ids), chunks[-1].n_tokens)
    return ids
