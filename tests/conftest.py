"""Shared fixtures: settings, fake engines, tiny checkpoints, and a launched app with a client."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from legal_eagle.config import Settings
from legal_eagle.engines.fake import FakeEngine
from legal_eagle.prompts import load_prompts
from legal_eagle.service import ModelService


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for tests: loopback, cache in tmp, small limits."""
    return Settings(host="127.0.0.1", port=free_port(), cache_dir=str(tmp_path / "cache"), max_input_chars=200,
                    concurrency_limit=8, max_queue_size=16)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint in Llama format (built once per test session)."""
    from legal_eagle.tiny_model import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_internlm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint in InternLM2 format, like the real download."""
    from legal_eagle.tiny_model import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "internlm2", arch="internlm2")


@pytest.fixture
def launch(settings: Settings) -> Iterator[Callable[..., Any]]:
    """Launch the real Blocks app on a free port; returns a gradio_client ``Client``."""
    from gradio_client import Client

    from legal_eagle.ui.app import build_app, launch_kwargs

    demos: list[Any] = []

    def _launch(engine: Any = None, service: ModelService | None = None, app_settings: Settings | None = None,
                ) -> Any:
        run_settings = app_settings or settings
        svc = service or ModelService.ready_with(engine or FakeEngine())
        demo = build_app(svc, run_settings, load_prompts())
        demos.append(demo)
        kwargs = launch_kwargs(run_settings)
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
        return Client(url, verbose=False)

    yield _launch
    for demo in demos:
        demo.close()
