"""The benchmark's report as markdown: targets table, one table per part, a replaceable section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from legal_eagle.bench.report import Target, dig, evaluate_targets, fmt, gb

BEGIN, END = "<!-- legal-eagle-bench:begin -->", "<!-- legal-eagle-bench:end -->"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table with padded columns (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def targets_table(targets: Sequence[Target]) -> str:
    """The PASS/FAIL table."""
    rows = [(t.number, t.name, t.goal, t.measured, fmt(t.ratio, 3), t.verdict) for t in targets]
    return format_table(("#", "target", "goal", "measured", "ratio", "result"), rows)


SIDES = {
    "raw": "raw engine",
    "pipe": "LMDeploy pipe",
    "app": "app (gradio_client)",
    "page": "app (page protocol)",
}


def serve_table(results: Mapping[str, Any]) -> str:
    """Raw engine vs app (and LMDeploy's own pipe) at each load level."""
    rows = []
    for part, label in (("serve_awq", "4-bit AWQ"), ("serve_hf", "fp16")):
        for side in ("raw", "pipe", "app", "page"):
            for users, s in sorted((dig(results, part, side) or {}).items(), key=lambda kv: int(kv[0])):
                rows.append(
                    (
                        label,
                        SIDES.get(side, side),
                        users,
                        fmt(s.get("requests"), 0),
                        fmt(s.get("errors"), 0),
                        fmt(s.get("ttft_ms_mean"), 0),
                        fmt(s.get("ttft_ms_p50"), 0),
                        fmt(s.get("decode_tok_s_mean")),
                        fmt(s.get("agg_tok_s"), 0),
                    )
                )
    return format_table(
        (
            "weights",
            "side",
            "users",
            "requests",
            "errors",
            "TTFT ms (mean)",
            "TTFT ms (p50)",
            "decode tok/s per user",
            "aggregate tok/s",
        ),
        rows,
    )


def prefix_table(results: Mapping[str, Any]) -> str:
    """TTFT per turn: fixed-text history with prefix caching on and off, and (caching on) a chat
    that keeps the engine's own answers, with the prompt tokens TurboMind took from its cache."""
    on, off = dig(results, "prefix_on", "turns") or [], dig(results, "prefix_off", "turns") or []
    own = dig(results, "prefix_on", "own_turns") or []
    rows = []
    for i in range(max(len(on), len(off), len(own))):
        a = on[i] if i < len(on) else {}
        b = off[i] if i < len(off) else {}
        c = own[i] if i < len(own) else {}
        row = [i + 1, fmt(a.get("prompt_tokens") or b.get("prompt_tokens"), 0), fmt(a.get("ttft_ms"), 0),
               fmt(b.get("ttft_ms"), 0)]
        if own:
            row += [fmt(c.get("prompt_tokens"), 0), fmt(c.get("cached_tokens"), 0), fmt(c.get("ttft_ms"), 0)]
        rows.append(tuple(row))
    head = ["turn", "prompt tokens", "TTFT ms, caching on", "TTFT ms, caching off"]
    if own:
        head += ["own answers: prompt tokens", "cached", "TTFT ms"]
    return format_table(tuple(head), rows)


def memory_table(results: Mapping[str, Any]) -> str:
    """GPU memory per engine configuration (NVML, one engine per process)."""
    rows = []
    for key, v in sorted(results.items()):
        if not isinstance(v, Mapping) or "memory_bytes" not in v and "peak_bytes" not in v:
            continue
        e = v.get("engine", {})
        rows.append(
            (
                key,
                e.get("model_format", "?"),
                e.get("quant_policy", "?"),
                e.get("cache_max_entry_count", "?"),
                e.get("max_batch_size", "?"),
                e.get("session_len", "?"),
                gb(v.get("memory_bytes")),
                gb(v.get("peak_bytes")),
                gb(v.get("serving_peak_bytes")),
                gb(v.get("torch_reserved_bytes")),
                gb(v.get("pool_reserved_high_bytes")),
                gb(v.get("torch_reserved_high_bytes")),
                gb(v.get("cuda_context_bytes")),
                v.get("memory_source", "?"),
                fmt(v.get("load_s")),
            )
        )
    return format_table(
        (
            "part",
            "weights",
            "KV quant",
            "cache share/blocks",
            "max batch",
            "session_len",
            "after load",
            "peak (load included)",
            "peak serving (torch cache released)",
            "torch cache",
            "default pool at most",
            "torch cache at most",
            "CUDA context",
            "measured by",
            "load s",
        ),
        rows,
    )


def long8_table(results: Mapping[str, Any]) -> str:
    """8 simultaneous chats of about 4k tokens: app settings vs the 8 GiB variants."""
    rows = []
    for key, v in sorted(results.items()):
        s = dig(v, "long8") if isinstance(v, Mapping) else None
        if s:
            rows.append(
                (
                    key,
                    fmt(dig(v, "long8_prompt_tokens"), 0),
                    fmt(s.get("requests"), 0),
                    fmt(s.get("errors"), 0),
                    fmt(s.get("ttft_ms_mean"), 0),
                    fmt(s.get("decode_tok_s_mean")),
                    fmt(s.get("agg_tok_s"), 0),
                    gb(v.get("peak_bytes") or v.get("memory_bytes")),
                )
            )
    return format_table(
        (
            "part",
            "prompt tokens",
            "requests",
            "errors",
            "TTFT ms",
            "decode tok/s per chat",
            "aggregate tok/s",
            "GPU memory",
        ),
        rows,
    )


def start_table(results: Mapping[str, Any]) -> str:
    """Cold and warm start, stage by stage."""
    rows = []
    for key in ("cold", "warm"):
        for stage, seconds in (dig(results, key, "stages") or {}).items():
            rows.append((key, stage, fmt(seconds)))
        if dig(results, key, "total_s") is not None:
            rows.append((key, "**total**", fmt(dig(results, key, "total_s"))))
    return format_table(("start", "stage", "seconds"), rows)


def tune_table(results: Mapping[str, Any]) -> str:
    """Target 6 experiments: batch-1 decode under different settings."""
    rows = [
        (
            v.get("name"),
            v.get("backend") or "turbomind",
            v.get("model_format"),
            v.get("max_batch_size"),
            v.get("quant_policy"),
            " ".join(f"{k}={val}" for k, val in {**(v.get("env") or {}), **(v.get("options") or {})}.items()) or "-",
            fmt(v.get("decode_tok_s")),
            fmt(v.get("ttft_ms"), 0),
            fmt(v.get("load_s")),
            v.get("error") or "",
        )
        for v in dig(results, "tune", "variants") or []
    ]
    return format_table(
        ("variant", "engine", "weights", "max batch", "KV quant", "env / options", "decode tok/s", "TTFT ms", "load s",
         "error"),
        rows,
    )


def render_markdown(results: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """The whole report: machine, versions, command, targets, then each part's table.

    Args:
        results: part name -> that part's result dict.
        meta: machine (gpu, driver), versions, command, date, notes.

    Returns:
        Markdown text (also fine to print).
    """
    versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())
    out = [
        BEGIN,
        f"## Benchmark run {meta.get('date', '')}",
        "",
        f"- Machine: {meta.get('gpu', 'n/a')}, driver {meta.get('driver', 'n/a')}, {meta.get('cpu', '')}",
        f"- Versions: {versions}",
        f"- Model: {meta.get('model', 'n/a')}",
        f"- Command: `{meta.get('command', '')}`",
    ]
    out += [f"- {note}" for note in meta.get("notes", [])]
    out += ["", "### Targets", "", targets_table(evaluate_targets(results))]
    sections = [
        ("Raw engine vs the app (gradio_client consumers)", serve_table, ("serve_awq", "serve_hf")),
        ("Time to first token over a 10-turn chat", prefix_table, ("prefix_on", "prefix_off")),
        ("GPU memory", memory_table, None),
        ("8 chats x 4k tokens", long8_table, None),
        ("Cold and warm start", start_table, ("cold", "warm")),
        ("4-bit decode experiments (target 6)", tune_table, ("tune",)),
    ]
    for title, table, keys in sections:
        if keys is not None and not any(k in results for k in keys):
            continue
        text = table(results)
        if text.count("\n") >= 2:
            out += ["", f"### {title}", "", text]
    failures = {k: v["error"] for k, v in results.items() if isinstance(v, Mapping) and v.get("error")}
    if failures:
        out += ["", "### Parts that failed", ""] + [f"- {k}: {v}" for k, v in sorted(failures.items())]
    out.append(END)
    return "\n".join(out) + "\n"


def write_section(path: Path, text: str) -> None:
    """Put ``text`` into ``path``: replace an earlier bench section, else append, else create."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        if BEGIN in old and END in old:
            head, _, rest = old.partition(BEGIN)
            _, _, tail = rest.partition(END)
            path.write_text(head + text.rstrip("\n") + tail, encoding="utf-8")
            return
        path.write_text(old.rstrip("\n") + "\n\n" + text, encoding="utf-8")
        return
    path.write_text("# Benchmarks\n\n" + text, encoding="utf-8")
