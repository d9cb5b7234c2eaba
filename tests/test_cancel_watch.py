"""``CancelWatch``: Gradio's cancels and dropped event streams reach the app's stop hook, and
every request passes on to Gradio unchanged."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from typing import Any

from legal_eagle.ui.cancel_watch import MAX_CANCEL_BODY, CancelWatch, StopHook


class Hook:
    def __init__(self) -> None:
        self.sessions: list[str] = []
        self.called = threading.Event()

    def __call__(self, session: str) -> None:
        self.sessions.append(session)
        self.called.set()


def run(watch: CancelWatch, scope: dict[str, Any], incoming: Sequence[dict[str, Any]]) -> None:
    """One request through the middleware; the hook's executor call is waited for."""
    async def main() -> None:
        queue = list(incoming)

        async def receive() -> dict[str, Any]:
            return queue.pop(0) if queue else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        await watch(scope, receive, send)
        await asyncio.sleep(0.05)  # the executor call is started by the middleware, not awaited

    asyncio.run(main())


class Downstream:
    """Gradio's stand-in: reads the whole body (as FastAPI does) and records it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def cancel_scope(path: str = "/gradio_api/cancel") -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "query_string": b""}


def test_a_cancel_of_a_chat_answer_tells_the_hook_and_gradio_gets_the_same_bytes() -> None:
    hook, gradio = Hook(), Downstream()
    watch = CancelWatch(gradio, StopHook(hook, fn_indices=[3, 4]))
    body = json.dumps({"event_id": "e1", "session_hash": "tab-1", "fn_index": 3}).encode()
    run(watch, cancel_scope(), [{"type": "http.request", "body": body[:10], "more_body": True},
                                {"type": "http.request", "body": body[10:]}])
    assert hook.called.wait(2) and hook.sessions == ["tab-1"]
    assert gradio.bodies == [body]


def test_other_cancels_and_bad_bodies_pass_on_without_a_stop() -> None:
    hook, gradio = Hook(), Downstream()
    watch = CancelWatch(gradio, StopHook(hook, fn_indices=[3]))
    bodies = [json.dumps({"session_hash": "tab-1", "fn_index": 9}).encode(),  # another event (the compare tab)
              b"\xff\xfe not json", b"[1, 2]", json.dumps({"session_hash": 5, "fn_index": 3}).encode(),
              json.dumps({"session_hash": "tab-1", "fn_index": 3, "pad": "x" * MAX_CANCEL_BODY}).encode()]
    for body in bodies:
        run(watch, cancel_scope(), [{"type": "http.request", "body": body}])
    run(watch, {"type": "http", "method": "POST", "path": "/gradio_api/queue/join", "query_string": b""},
        [{"type": "http.request", "body": json.dumps({"session_hash": "tab-1", "fn_index": 3}).encode()}])
    assert not hook.called.wait(0.2)
    assert gradio.bodies == [*bodies, json.dumps({"session_hash": "tab-1", "fn_index": 3}).encode()]


class EventStream:
    """Gradio's event stream: polls for a disconnect (as ``request.is_disconnected()`` does) between
    messages, and either ends the response itself or finds the client gone."""

    def __init__(self, end_first: bool) -> None:
        self.end_first = end_first

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        if self.end_first:
            await send({"type": "http.response.body", "body": b""})
        await receive()  # the client has gone (or, after the end, uvicorn says so anyway)


def test_an_event_stream_dropped_mid_answer_stops_its_session_only_before_the_end() -> None:
    scope = {"type": "http", "method": "GET", "path": "/gradio_api/queue/data",
             "query_string": b"session_hash=tab-7"}
    hook = Hook()
    run(CancelWatch(EventStream(end_first=True), StopHook(hook, [1])), scope, [])
    assert not hook.called.wait(0.2)  # a stream that Gradio ended is no client going away
    run(CancelWatch(EventStream(end_first=False), StopHook(hook, [1])), scope, [])
    assert hook.called.wait(2) and hook.sessions == ["tab-7"]


def test_a_failing_hook_does_not_fail_the_request() -> None:
    gradio = Downstream()

    def broken(session: str) -> None:
        raise RuntimeError("engine close failed")

    body = json.dumps({"session_hash": "tab-1", "fn_index": 3}).encode()
    run(CancelWatch(gradio, StopHook(broken, [3])), cancel_scope(), [{"type": "http.request", "body": body}])
    assert gradio.bodies == [body]
