"""Hearing Gradio's own stop decisions, so that the engine hears them too.

Gradio ends a running event in two ways: a ``POST …/cancel`` (the page's Stop and Clear buttons,
gradio_client's ``job.cancel()``) and a session's event stream (``GET …/queue/data``) dropped
by its client, after which Gradio drops the session's events. Either way it then closes the
handler's generator — which on the GPU machine did not reliably happen (docs/reliability.md).

``CancelWatch`` is a plain ASGI middleware in front of Gradio's app that changes nothing it
passes on: it reads a cancel's small JSON body (and hands the same bytes to Gradio), and it
notes when a client drops an event stream before the response ended. It then calls
``on_stop(session_hash)`` off the event loop — for a cancel only when the cancelled event is
one of ``fn_indices`` (the chat answers). Installed through ``launch(app_kwargs=...)`` by
``ui.app.launch_kwargs``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

log = logging.getLogger(__name__)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
MAX_CANCEL_BODY = 16 * 1024  # a cancel's body is ~100 bytes; anything larger is passed on unread


@dataclass(frozen=True)
class StopHook:
    """Whom to tell: ``on_stop(session_hash)`` for cancels of ``fn_indices`` and for dropped streams."""

    on_stop: Callable[[str], object]
    fn_indices: Collection[int]


class CancelWatch:
    """ASGI middleware: tells ``hook.on_stop`` about Gradio cancels and dropped event streams."""

    def __init__(self, app: ASGIApp, hook: StopHook) -> None:
        self.app = app
        self.hook = hook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope.get("type") == "http" else ""
        if scope.get("method") == "POST" and path.endswith("/cancel"):
            await self._cancel(scope, receive, send)
        elif scope.get("method") == "GET" and path.endswith("/queue/data"):
            await self._event_stream(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _cancel(self, scope: Scope, receive: Receive, send: Send) -> None:
        messages: list[Message] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            whole = message["type"] == "http.request" and not message.get("more_body")
            if whole or message["type"] != "http.request" or len(body) > MAX_CANCEL_BODY:
                break
        if whole and len(body) <= MAX_CANCEL_BODY:
            session, fn = _cancelled(body)
            if session is not None and fn in self.hook.fn_indices:
                self._tell(session, "cancel")
        replay = iter(messages)

        async def replayed() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    async def _event_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash") or [None])[0]
        ended = False

        async def sending(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True
            await send(message)

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not ended and session:
                self._tell(session, "event stream dropped")
            return message

        await self.app(scope, receiving, sending)

    def _tell(self, session: str, why: str) -> None:
        log.info("stopping the answers of a session: %s", why)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self.hook.on_stop, session)  # an engine's close may block
        future.add_done_callback(_log_failure)


def _cancelled(body: bytes) -> tuple[str | None, int | None]:
    """The session and fn_index of a cancel request's JSON body (None where absent or malformed)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    session, fn = data.get("session_hash"), data.get("fn_index")
    return (session if isinstance(session, str) else None), (fn if isinstance(fn, int) else None)


def _log_failure(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("stopping a session's answers failed", exc_info=future.exception())
