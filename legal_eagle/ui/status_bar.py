"""The line at the top of the page that says whether the model is ready, and why not."""

from __future__ import annotations

import gradio as gr

from legal_eagle.service import ModelService, Status


def status_markdown(status: Status, service: ModelService) -> str:
    """Markdown for the model status line."""
    paused = service.paused()
    if paused is not None:
        return f"🟡 **{paused}**"
    if status.ready:
        engine = service.engine_or_none
        if engine is None:
            return "模型已就绪"
        info = engine.info
        memory = engine.gpu_memory_bytes()
        gpu = f" · 显存 {memory / 2**30:.1f} GiB" if memory else ""
        return (f"🟢 **模型已就绪**：{info.name}（{info.quantization}，{info.backend}）"
                f" · 上下文 {info.context_len} tokens{gpu} · 准备用时 {status.elapsed_s:.0f} 秒")
    if status.stage == "failed":
        return f"🔴 **模型准备失败**：{status.detail}"
    return f"🟡 **{status.describe()}** —— 页面会在模型就绪后自动可用。"


def build_status_bar(service: ModelService) -> gr.Markdown:
    """The status line, refreshed every second until the model is ready or has failed."""
    bar = gr.Markdown(lambda: status_markdown(service.status(), service), elem_id="model-status")
    timer = gr.Timer(1.0)  # each page polls until the model is ready or failed, then stops

    def refresh() -> tuple[str, gr.Timer]:
        status = service.status()
        done = status.ready or status.stage == "failed"
        return status_markdown(status, service), gr.Timer(active=not done)

    timer.tick(refresh, outputs=[bar, timer], api_name=False, concurrency_limit=None, show_progress="hidden")
    return bar
