"""Export a conversation as Markdown or JSON, with model, settings and the disclaimer."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from legal_eagle import __version__
from legal_eagle.engines.base import EngineInfo

ROLE_TITLES = {"user": "🧑 用户", "assistant": "⚖️ Legal-Eagle", "system": "系统提示"}


def export_meta(info: EngineInfo | None, persona: str, disclaimer: str) -> dict[str, Any]:
    """What every export records besides the turns."""
    model: dict[str, Any] = {"name": "(未加载)"}
    if info is not None:
        model = {"name": info.name, "backend": info.backend, "model_path": info.model_path,
                 "model_format": info.model_format, "quantization": info.quantization,
                 "context_len": info.context_len}
    return {
        "app": f"Legal-Eagle {__version__}",
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "system_prompt": persona,
        "disclaimer": disclaimer,
    }


def to_json(turns: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The conversation as pretty JSON: ``meta`` plus ``messages`` (each with its own settings)."""
    return json.dumps({**meta, "messages": [dict(t) for t in turns]}, ensure_ascii=False, indent=2)


def to_markdown(turns: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The conversation as Markdown, disclaimer first and sampling settings under each answer."""
    model = meta.get("model", {})
    lines = [
        "# Legal-Eagle 法律咨询记录",
        "",
        f"> {meta.get('disclaimer', '')}",
        "",
        f"- 导出时间：{meta.get('exported_at', '')}",
        f"- 模型：{model.get('name', '')}（{model.get('quantization', '')}，{model.get('backend', '')}）",
        f"- 模型路径：{model.get('model_path', '')}",
        f"- 系统提示：{meta.get('system_prompt', '')}",
        "",
    ]
    for turn in turns:
        lines += [f"## {ROLE_TITLES.get(turn['role'], turn['role'])}", "", str(turn["content"]), ""]
        settings = turn.get("meta")
        if settings:
            sampling = settings.get("sampling", {})
            figures = ", ".join(f"{k}={v}" for k, v in sampling.items())
            lines += [f"<sub>生成设置：{figures}；输出 {settings.get('tokens', '?')} tokens；"
                      f"结束原因：{settings.get('finish_reason', '?')}</sub>", ""]
    return "\n".join(lines)
