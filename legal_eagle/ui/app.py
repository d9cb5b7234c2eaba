"""``build_app``: the whole Blocks page, from services and settings passed in (no globals)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from concurrent.futures import Future

import gradio as gr
from fastapi.middleware import Middleware

from legal_eagle.citations import StatuteBase
from legal_eagle.compare import EngineProvider, UnavailableProvider
from legal_eagle.config import Settings
from legal_eagle.prompts import Prompts
from legal_eagle.service import ModelService
from legal_eagle.ui.cancel_watch import CancelWatch, StopHook
from legal_eagle.ui.chat_tab import ChatHandlers, build_chat_tab
from legal_eagle.ui.compare_tab import CompareHandlers, build_compare_tab
from legal_eagle.ui.frontend_zh import JS as ZH_MESSAGES_JS
from legal_eagle.ui.health import health_routes, parse_auth
from legal_eagle.ui.status_bar import build_status_bar

TITLE = "Legal-Eagle 法律咨询"
STOP_HOOK = "legal_eagle_stop_hook"  # the attribute of a built app that says whom Gradio's cancels concern
CSS = """
#disclaimer { font-size: 0.85em; opacity: 0.85; }
#model-status { font-size: 0.9em; }
"""


def skip_missing_matplotlib() -> bool:
    """Make ``import matplotlib`` fail at once where matplotlib is not installed; True if it was done.

    Gradio wraps every event in ``MatplotlibBackendMananger``, which tries ``import matplotlib``
    twice per call; a module that is not installed is searched for on ``sys.path`` again each
    time (Python caches no failure). While answers stream that is every update: 8 % of the
    server's CPU under 8 users in a py-spy profile. ``sys.modules[name] = None`` is Python's own
    way to say "not importable" (``import`` then raises ImportError without searching).
    """
    if "matplotlib" in sys.modules or importlib.util.find_spec("matplotlib") is not None:
        return False
    sys.modules["matplotlib"] = None  # type: ignore[assignment]
    return True


def build_app(service: ModelService, settings: Settings, prompts: Prompts,
              statutes: Future[StatuteBase | None] | None = None,
              comparison: EngineProvider | None = None) -> gr.Blocks:
    """Assemble the page: the chat tab and the fp16 vs 4-bit comparison tab.

    Args:
        service: the chat model's service (ready or still preparing); the 4-bit side of the comparison.
        settings: the run's settings.
        prompts: persona, disclaimer and examples.
        statutes: the statute base being opened in the background (None: citation features off).
        comparison: hands out the fp16 engine (``loader.comparison_provider``); None: the tab says
            that no comparison is set up on this run.

    Returns:
        The Blocks app with its queue configured; launch it with ``launch_kwargs()``.
    """
    skip_missing_matplotlib()
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# ⚖️ {TITLE}\n"
                    "基于 Legal-Eagle InternLM2-chat-7B（4-bit AWQ，LMDeploy TurboMind）的中文法律问答演示。")
        build_status_bar(service)
        with gr.Tabs():
            with gr.Tab("法律咨询", id="chat"):
                chat = ChatHandlers(service=service, settings=settings, prompts=prompts, statutes=statutes)
                answer_events = build_chat_tab(chat)
            with gr.Tab("fp16 与 4-bit 对比", id="compare"):
                provider = comparison or UnavailableProvider("本次运行没有配置 fp16 对比模型。")
                build_compare_tab(CompareHandlers(service=service, provider=provider, settings=settings,
                                                  prompts=prompts))
    demo.queue(default_concurrency_limit=settings.concurrency_limit, max_size=settings.max_queue_size)
    setattr(demo, STOP_HOOK, StopHook(chat.answers.stop, answer_events))  # read by launch_kwargs
    return demo


def launch_kwargs(demo: gr.Blocks, settings: Settings,
                  services: Mapping[str, ModelService] | None = None) -> dict[str, object]:
    """Arguments for ``demo.launch`` that follow from the app and the settings.

    Args:
        demo: the app from ``build_app`` (its chat answers are stopped on Gradio's cancels).
        settings: the run's settings.
        services: model services by name; when given, ``GET /healthz`` reports their state.
    """
    kwargs: dict[str, object] = {
        "server_name": settings.host,
        "server_port": settings.port,
        "max_threads": settings.concurrency_limit + 40,
        "css": CSS,
        "js": ZH_MESSAGES_JS,  # Gradio's few English-only page messages (a full queue) in Chinese
        "theme": gr.themes.Soft(),
        "show_error": True,
    }
    app_kwargs: dict[str, object] = {"middleware": [Middleware(CancelWatch, hook=getattr(demo, STOP_HOOK))]}
    if services is not None:
        app_kwargs["routes"] = health_routes(services)
    kwargs["app_kwargs"] = app_kwargs
    users = parse_auth(settings.auth)
    if users:
        kwargs["auth"] = users
    return kwargs
