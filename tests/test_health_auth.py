"""/healthz on the launched Gradio 6 app, and login that protects the page AND the API."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import wait_for
from test_app import ask, text_of

from legal_eagle.config import Settings
from legal_eagle.engines.fake import FakeEngine
from legal_eagle.errors import ModelPreparationError
from legal_eagle.prompts import load_prompts
from legal_eagle.service import ModelService
from legal_eagle.ui.app import build_app, launch_kwargs
from legal_eagle.ui.health import health_payload, health_routes, mount_health, parse_auth

USERS = [("lawyer", "s3cret:pass"), ("guest", "guest-pw")]


@pytest.fixture
def launched(settings: Settings) -> Iterator[Any]:
    """Launch the real page with extra launch arguments; returns ``(demo, url)``."""
    demos: list[Any] = []

    def _launch(service: ModelService, services: Any = None, **extra: Any) -> tuple[Any, str]:
        demo = build_app(service, settings, load_prompts())
        demos.append(demo)
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True,
                                **(launch_kwargs(demo, settings, services) | extra))
        return demo, url

    yield _launch
    for demo in demos:
        demo.close()


def blocked_service() -> tuple[ModelService, threading.Event]:
    """A service stuck in 'loading' until the event is set."""
    release = threading.Event()

    def prepare(progress: Any) -> FakeEngine:
        progress("loading", 0.5, "weights")
        release.wait(30)
        return FakeEngine()

    service = ModelService(prepare, name="chat")
    service.start()
    return service, release


def test_parse_auth() -> None:
    assert parse_auth(None) is None and parse_auth("  ") is None
    assert parse_auth("lawyer:s3cret:pass, guest:guest-pw") == USERS
    for bad, why in (("nopassword", "user:password"), ("u:", "user:password"), (":pw-zz", "user:password"),
                     ("a:pw-x1,,b:pw-x2", "empty entry"), ("a:pw-x1,a:pw-x2", "twice")):
        with pytest.raises(ValueError, match=why) as err:
            parse_auth(bad)
        assert "pw-" not in str(err.value)
    with pytest.raises(ValueError) as hidden:
        parse_auth("ok:fine,broken")
    assert "fine" not in str(hidden.value)  # never echo a password


def test_health_payload_states() -> None:
    service, release = blocked_service()
    assert wait_for(lambda: service.status().stage == "loading")
    status, body = health_payload({"chat": service}, extra=lambda: {"platform": {"ok": True}})
    assert status == 503 and body["status"] == "preparing" and body["services"]["chat"]["fraction"] == 0.5
    assert body["platform"] == {"ok": True}
    release.set()
    assert service.wait(10)
    status, body = health_payload({"chat": service})
    assert status == 200 and body["services"]["chat"]["paused"] is None
    with service.suspended(lambda: FakeEngine(), "精度对比进行中，聊天暂停。"):  # a comparison has the GPU
        status, body = health_payload({"chat": service})
        assert status == 200 and body["services"]["chat"]["paused"] == "精度对比进行中，聊天暂停。"
    assert health_payload({"chat": service})[1]["services"]["chat"]["paused"] is None

    def fail(progress: Any) -> FakeEngine:
        raise ModelPreparationError("下载模型失败：网络不可用。", "offline")

    failed = ModelService(fail, name="chat")
    failed.run()
    status, body = health_payload({"chat": service, "failed": failed})
    assert status == 503 and body["status"] == "failed" and "网络不可用" in body["services"]["failed"]["detail"]
    assert health_payload({})[0] == 503  # no service at all is not healthy


def test_healthz_on_launched_app_as_app_py_launches_it(launched: Any, settings: Settings) -> None:
    service, release = blocked_service()
    _, url = launched(service, services={"chat": service})  # what app.py passes
    assert wait_for(lambda: service.status().stage == "loading")
    preparing = httpx.get(url + "healthz")
    assert preparing.status_code == 503 and preparing.json()["services"]["chat"]["stage"] == "loading"
    assert preparing.headers["cache-control"] == "no-store"
    release.set()
    assert wait_for(lambda: httpx.get(url + "healthz").status_code == 200)
    assert httpx.get(url + "healthz").json()["status"] == "ready"
    assert httpx.head(url + "healthz").status_code == 200
    assert httpx.get(url).status_code == 200  # the page itself still works


def test_mount_health_after_launch(launched: Any) -> None:
    service = ModelService.ready_with(FakeEngine())
    demo, url = launched(service)
    mount_health(demo.app, {"chat": service}, path="/ready")
    answer = httpx.get(url + "ready")
    assert answer.status_code == 200 and answer.json()["ready"] is True


def test_auth_protects_page_and_api_but_not_healthz(launched: Any) -> None:
    from gradio_client import Client

    service = ModelService.ready_with(FakeEngine())
    _, url = launched(service, auth=parse_auth("lawyer:s3cret:pass,guest:guest-pw"),
                      app_kwargs={"routes": health_routes({"chat": service})})
    page = httpx.get(url)
    assert page.status_code == 200 and '"auth_required":true' in page.text.replace(" ", "")
    assert "法律咨询" not in page.text  # the login page carries none of the app's components
    assert httpx.get(url + "config").status_code == 401
    assert httpx.get(url + "gradio_api/info").status_code == 401
    join = httpx.post(url + "gradio_api/queue/join",
                      json={"data": ["公司拖欠工资怎么办？"], "fn_index": 0, "session_hash": "intruder"})
    assert join.status_code == 401
    assert httpx.post(url + "gradio_api/call/chat", json={"data": ["x"]}).status_code == 401
    with pytest.raises(Exception, match="(?i)credentials|login|auth"):
        Client(url, verbose=False)
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises a plain Exception subclass
        Client(url, auth=("lawyer", "wrong"), verbose=False)
    assert httpx.post(url + "login", data={"username": "guest", "password": "nope"}).status_code == 400
    login = httpx.post(url + "login", data={"username": "guest", "password": "guest-pw"})
    assert login.status_code == 200 and "法律咨询" in httpx.get(url + "config", cookies=login.cookies).text
    client = Client(url, auth=USERS[0], verbose=False)
    chat, _, _ = ask(client, "公司拖欠工资怎么办？")
    assert "第1轮" in text_of(chat[-1]["content"])
    assert httpx.get(url + "healthz").status_code == 200  # probes need no password


def test_auth_setting_reaches_launch_and_bad_values_are_config_errors(settings: Any) -> None:
    from dataclasses import replace

    demo = build_app(ModelService.ready_with(FakeEngine()), settings, load_prompts())
    assert "auth" not in launch_kwargs(demo, settings)
    kwargs = launch_kwargs(demo, replace(settings, auth="lawyer:s3cret:pass,guest:guest-pw"))
    assert kwargs["auth"] == USERS
    loaded = Settings.load([], {"LE_AUTH": "guest:guest-pw"})
    assert launch_kwargs(demo, loaded)["auth"] == [("guest", "guest-pw")]
    with pytest.raises(ValueError, match="user:password"):
        Settings.load(["--auth", "nopassword"], {})
