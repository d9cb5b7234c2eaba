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


def wait_for(condition: Callable[[], object], timeout: float = 10.0, poll_s: float = 0.02) -> bool:
    """Poll until ``condition`` holds or ``timeout`` seconds are up; returns its last value as a bool."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(poll_s)
    return bool(condition())


def shared_laws_dir() -> Path:
    """The statute corpus of ../shared/laws beside the checkout (or LE_TEST_LAWS_DIR)."""
    import os

    given = os.environ.get("LE_TEST_LAWS_DIR")
    if given:
        return Path(given)
    beside = Path(__file__).resolve().parents[2] / "shared" / "laws"
    return beside if beside.is_dir() else Path("/work/shared/laws")


@pytest.fixture(scope="session")
def labour_statutes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A statute base of two real laws (劳动合同法, 劳动法) from ../shared/laws, opened as the app opens it."""
    import shutil
    from concurrent.futures import Future

    from legal_eagle.citations import StatuteBase

    src = shared_laws_dir() / "6-社会法"
    if not src.is_dir():
        pytest.skip(f"statute corpus not at {src.parent}")
    laws = tmp_path_factory.mktemp("laws") / "6-社会法"
    laws.mkdir()
    for name in ("劳动合同法（2012-12-28）.md", "劳动法（2018-12-29）.md"):
        shutil.copy(src / name, laws / name)
    future: Future[Any] = Future()
    future.set_result(StatuteBase.open(laws.parent, tmp_path_factory.mktemp("index")))
    return future


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
                statutes: Any = None) -> Any:
        run_settings = app_settings or settings
        svc = service or ModelService.ready_with(engine or FakeEngine())
        demo = build_app(svc, run_settings, load_prompts(), statutes)
        demos.append(demo)
        kwargs = launch_kwargs(demo, run_settings)
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
        return Client(url, verbose=False)

    yield _launch
    for demo in demos:
        demo.close()
