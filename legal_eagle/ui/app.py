"""``build_app``: the whole Blocks page, from services and settings passed in (no globals)."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future

import gradio as gr

from legal_eagle.citations import StatuteBase
from legal_eagle.config import Settings
from legal_eagle.prompts import Prompts
from legal_eagle.service import ModelService
from legal_eagle.ui.chat_tab import ChatHandlers, build_chat_tab
from legal_eagle.ui.health import health_routes, parse_auth
from legal_eagle.ui.status_bar import build_status_bar

TITLE = "Legal-Eagle 法律咨询"
CSS = """
#disclaimer { font-size: 0.85em; opacity: 0.85; }
#model-status { font-size: 0.9em; }
"""


def build_app(service: ModelService, settings: Settings, prompts: Prompts,
              statutes: Future[StatuteBase | None] | None = None) -> gr.Blocks:
    """Assemble the page.

    Args:
        service: the chat model's service (ready or still preparing).
        settings: the run's settings.
        prompts: persona, disclaimer and examples.
        statutes: the statute base being opened in the background (None: citation features off).

    Returns:
        The Blocks app with its queue configured; launch it with ``launch_kwargs()``.
    """
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# ⚖️ {TITLE}\n"
                    "基于 Legal-Eagle InternLM2-chat-7B（4-bit AWQ，LMDeploy TurboMind）的中文法律问答演示。")
        build_status_bar(service)
        with gr.Tabs(), gr.Tab("法律咨询", id="chat"):
            build_chat_tab(ChatHandlers(service=service, settings=settings, prompts=prompts, statutes=statutes))
    demo.queue(default_concurrency_limit=settings.concurrency_limit, max_size=settings.max_queue_size)
    return demo


def launch_kwargs(settings: Settings, services: Mapping[str, ModelService] | None = None) -> dict[str, object]:
    """Arguments for ``demo.launch`` that follow from the settings.

    Args:
        settings: the run's settings.
        services: model services by name; when given, ``GET /healthz`` reports their state.
    """
    kwargs: dict[str, object] = {
        "server_name": settings.host,
        "server_port": settings.port,
        "max_threads": settings.concurrency_limit + 40,
        "css": CSS,
        "theme": gr.themes.Soft(),
        "show_error": True,
    }
    if services is not None:
        kwargs["app_kwargs"] = {"routes": health_routes(services)}
    users = parse_auth(settings.auth)
    if users:
        kwargs["auth"] = users
    return kwargs
