"""Load drivers: N simultaneous users against an engine (raw) or against the running app.

Both sides send the same messages with the same sampling settings and time each request the
same way (``Trace``: first output carrying tokens, then tokens per second after it). The app
side launches the real ``build_app`` page on a free port with the very engine object the raw
side uses, and each user is its own ``gradio_client.Client`` (its own session), either as
threads of this process or, for honest timings on the GPU, in child processes (one per user up
to half the cores: ``bench.child.process_consumers``).

gradio_client itself adds latency: it polls its message queue every 50 ms
(``gradio_client.utils.stream_sse_v1plus``). So the app side is also measured the way the web
page receives it (``page_request``: ``queue/join``, then the ``queue/data`` event stream, read as it
arrives), which separates the app's cost from the client library's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import uuid4

from legal_eagle.bench.report import RequestResult, summarise
from legal_eagle.config import Settings
from legal_eagle.conversation import build_messages
from legal_eagle.engines.base import Engine, Message, SamplingParams

log = logging.getLogger(__name__)

MIN_DECODE_WINDOW_S = 0.1
UserFactory = Callable[[int], Callable[[int], RequestResult]]
_TOKENS = re.compile(r"(\d+) tokens(?!/)")
FILLER = (
    "根据《中华人民共和国劳动合同法》第三十八条，用人单位未及时足额支付劳动报酬的，劳动者可以解除劳动合同，"
    "并可以要求用人单位支付经济补偿。劳动者应当保留工资条、银行流水、考勤记录等证据，先与用人单位协商；"
    "协商不成的，可以向劳动争议仲裁委员会申请仲裁，对仲裁裁决不服的，可以向人民法院提起诉讼。"
)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_tokens(status: Any) -> int:
    """Output tokens the chat tab's status line reports ('正在生成… 37 tokens' -> 37; none -> 0)."""
    match = _TOKENS.search(str(status or ""))
    return int(match.group(1)) if match else 0


def run_users(
    make_user: UserFactory,
    users: int,
    rounds: int,
    timeout_s: float = 600.0,
    *,
    first_user: int = 0,
    gate: Callable[[], None] | None = None,
) -> list[RequestResult]:
    """Run ``users`` users at once, each sending ``rounds`` requests back to back.

    Args:
        make_user: called once per user (in that user's thread, before the start signal) with
            the user's index; returns ``request(round) -> RequestResult``.
        users: simultaneous users.
        rounds: requests per user.
        timeout_s: give up waiting for the users after this long.
        first_user: index of the first user (users of several processes get distinct indices).
        gate: called once every user is set up, before any starts (a consumer process waits
            there for the parent's start signal, so that all processes start together).

    Returns:
        Every request's result; a request that raised is recorded with its error.
    """
    barrier = threading.Barrier(users + 1)
    go = threading.Event()
    results: list[RequestResult] = []
    lock = threading.Lock()

    def user(index: int) -> None:
        request: Callable[[int], RequestResult] | None = None
        setup_error = None
        try:
            request = make_user(index)
        except Exception as exc:
            setup_error = f"setup failed: {type(exc).__name__}: {exc}"
        try:
            barrier.wait(timeout_s)
        except threading.BrokenBarrierError:
            setup_error = setup_error or "the other users never got ready"
        go.wait(timeout_s)
        for r in range(rounds):
            t0 = time.perf_counter()
            try:
                if request is None:
                    raise RuntimeError(setup_error)
                result = request(r)
            except Exception as exc:
                result = RequestResult(
                    index, t0, time.perf_counter(), 0, None, None, f"{type(exc).__name__}: {exc}"
                )
            with lock:
                results.append(result)

    threads = [
        threading.Thread(target=user, args=(i,), name=f"bench-user-{i}", daemon=True)
        for i in range(first_user, first_user + users)
    ]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout_s)
    try:
        if gate is not None:
            gate()
    finally:
        go.set()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        log.warning("%d users still running after %.0f s", sum(t.is_alive() for t in threads), timeout_s)
    return results


@dataclass
class Trace:
    """Arrival times of a streamed answer's growing token count.

    Time to first token is the first arrival that carries tokens. Decode speed counts from the
    SECOND such arrival to the last: a web page's first update carries start-up latency that
    later updates do not, which would shrink the window and inflate the rate. Both sides are
    measured by this same rule. A window shorter than ``MIN_DECODE_WINDOW_S`` gives no rate:
    a client that receives a whole answer in one burst (seen with gradio_client under load on
    the GPU: 888,990 tok/s) has not measured a speed.
    """

    t0: float = field(default_factory=time.perf_counter)
    events: list[tuple[float, int]] = field(default_factory=list)

    def record(self, n_tokens: int) -> None:
        """Note the cumulative token count now (ignored unless it grew)."""
        if n_tokens > (self.events[-1][1] if self.events else 0):
            self.events.append((time.perf_counter(), n_tokens))

    def result(self, user: int, error: str | None = None) -> RequestResult:
        """The finished request's figures."""
        end = time.perf_counter()
        ev = self.events
        ttft = ev[0][0] - self.t0 if ev else None
        first = ev[1] if len(ev) >= 3 else (ev[0] if ev else None)
        decode = None
        if first is not None and ev[-1][0] - first[0] >= MIN_DECODE_WINDOW_S:
            decode = (ev[-1][1] - first[1]) / (ev[-1][0] - first[0])
        return RequestResult(
            user=user,
            start=self.t0,
            end=end,
            n_tokens=ev[-1][1] if ev else 0,
            ttft_s=ttft,
            decode_tok_s=decode,
            error=error,
        )


def engine_request(
    engine: Engine,
    messages: Sequence[Message],
    params: SamplingParams,
    user: int = 0,
) -> RequestResult:
    """One answer straight from ``engine.stream``, timed."""
    trace = Trace()
    with closing(engine.stream(messages, params)) as stream:  # type: ignore[type-var]
        for chunk in stream:
            trace.record(chunk.n_tokens)
    return trace.result(user)


def chat_inputs(question: str, persona: str, params: SamplingParams) -> list[Any]:
    """The inputs of the chat tab's ``/chat`` event as its API takes them, in order."""
    return [question, persona, params.temperature, params.top_p, params.max_new_tokens,
            params.repetition_penalty, params.greedy]


@contextlib.contextmanager
def http_timeline(say: Callable[[str], None]) -> Iterator[None]:
    """Report every HTTP request this process makes through httpx (gradio_client's included):
    when it was sent and when its response headers came back, on one clock with ``app_request``'s
    own lines. For finding where a client's time to first token goes."""
    import httpx

    send = httpx.Client.send

    def timed(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        response = send(self, request, *args, **kwargs)
        say(f"http {request.method} {request.url.path} sent {t:.3f} headers +{(time.perf_counter() - t) * 1000:.0f} ms")
        return response

    httpx.Client.send = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        httpx.Client.send = send  # type: ignore[method-assign]


def app_request(
    client: Any, question: str, persona: str, params: SamplingParams, user: int = 0
) -> RequestResult:
    """One answer through the app's ``/chat`` endpoint, timed from submit to each streamed update."""
    trace = Trace()
    job = client.submit(*chat_inputs(question, persona, params), api_name="/chat")
    for index, output in enumerate(job_updates(job)):
        if index == 0:
            log.debug("user %d: submitted %.3f, first update %.3f", user, trace.t0, time.perf_counter())
        trace.record(status_tokens(output[-1] if isinstance(output, (tuple, list)) else output))
    error = None
    try:
        job.result(timeout=60)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    return trace.result(user, error)


def gradio_client_for(url: str) -> Any:
    """A gradio_client ``Client`` (one session) for the app at ``url``.

    On a plain-HTTP URL it is made with ``ssl_verify=False``: there is no TLS there to verify, and
    gradio_client 2.7.2 otherwise builds an SSL context and loads the CA bundle for every request
    and every event stream it opens (``httpx.post(..., verify=True)``: 20-25 ms each on the CPU
    machine against about 1 ms; twice per answer).
    """
    from gradio_client import Client

    if url.startswith("http://"):
        return Client(url, verbose=False, ssl_verify=False)
    return Client(url, verbose=False)


def job_updates(job: Any, poll_s: float = 0.001) -> Iterator[Any]:
    """A gradio_client job's streamed outputs as they arrive, polled with the job's lock released.

    ``iter(job)`` (gradio_client 2.7.2's ``Job.__next__``) sleeps 1 ms *holding* the lock that the
    client's own message reader needs to append an output; on the 16-core GPU machine the reader
    then waited seconds for it (a traced session: first output read 0.12 s after submit, seen by
    the iterator 2.55 s after). ``job.outputs()`` takes that lock only to hand over the list.
    """
    seen = 0
    while True:
        done = job.done()
        outputs = job.outputs()
        while seen < len(outputs):
            seen += 1
            yield outputs[seen - 1]
        if done:
            return
        time.sleep(poll_s)


def fn_index(http: Any, url: str, api_name: str = "chat") -> int:
    """The ``fn_index`` the page sends for an event of the app (``api_name`` as in ``ui/chat_tab.py``)."""
    deps = http.get(url.rstrip("/") + "/config").raise_for_status().json()["dependencies"]
    return int(next(dep["id"] for dep in deps if dep.get("api_name") == api_name))


def apply_string_diff(current: str, update: Any) -> str:
    """A string output after one streamed update: Gradio sends the whole value first, then diff ops
    (``[["replace", [], "..."]]`` or ``[["append", [], "..."]]``)."""
    if isinstance(update, str):
        return update
    for op, path, value in update or ():
        if path:
            continue
        current = value if op == "replace" else current + value if op == "append" else current
    return current


def page_request(
    http: Any, url: str, fn_index: int, question: str, persona: str, params: SamplingParams, user: int = 0,
    session: str | None = None,
) -> RequestResult:
    """One answer the way the web page gets it: ``queue/join``, then the event stream as it arrives.

    Timed like ``app_request``: each update's token count is read from the status line (output 3).
    ``session``: the tab's session hash; its earlier turns are the history (default: a new tab).
    """
    trace, status, error = Trace(), "", None
    session = session or uuid4().hex[:11]
    base = url.rstrip("/") + "/gradio_api/queue"
    data = chat_inputs(question, persona, params)
    data.insert(1, None)  # the page also sends the gr.State input; None: the session's own
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
    http.post(base + "/join", json=body).raise_for_status()
    with http.stream("GET", base + "/data", params={"session_hash": session}) as response:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("msg") not in ("process_generating", "process_completed"):
                continue
            output = msg.get("output") or {}
            if not msg.get("success", True) or output.get("error"):
                error = str(output.get("error") or "the app reported a failure")
                break
            status = apply_string_diff(status, output["data"][3])
            trace.record(status_tokens(status))
            if msg["msg"] == "process_completed":
                break
    return trace.result(user, error)


def page_level_results(
    url: str,
    questions: Sequence[str],
    persona: str,
    params: SamplingParams,
    users: int,
    rounds: int,
    *,
    first_user: int = 0,
    gate: Callable[[], None] | None = None,
) -> list[RequestResult]:
    """``users`` page-protocol users against the app at ``url``, each one browser tab: one HTTP
    connection and one session, so that a user's later rounds carry its earlier turns (as
    gradio_client's users do)."""
    import httpx

    def make_user(index: int) -> Callable[[int], RequestResult]:
        http = httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0))
        chat, tab = fn_index(http, url), uuid4().hex[:11]

        def request(round_: int) -> RequestResult:
            question = question_for(questions, index, round_)
            return page_request(http, url, chat, question, persona, params, index, session=tab)

        return request

    return run_users(make_user, users, rounds, first_user=first_user, gate=gate)


def question_for(questions: Sequence[str], user: int, round_: int) -> str:
    """The question a user asks in a round (the same on both sides)."""
    return questions[(user + round_ * 7) % len(questions)]


def raw_level(
    engine: Engine, questions: Sequence[str], persona: str, params: SamplingParams, users: int, rounds: int
) -> dict[str, Any]:
    """``users`` threads calling the engine directly; the level's summary."""

    def make_user(index: int) -> Callable[[int], RequestResult]:
        def request(round_: int) -> RequestResult:
            messages = build_messages(persona, [], question_for(questions, index, round_))
            return engine_request(engine, messages, params, index)

        return request

    return summarise(run_users(make_user, users, rounds), users)


def app_level_results(
    url: str,
    questions: Sequence[str],
    persona: str,
    params: SamplingParams,
    users: int,
    rounds: int,
    *,
    first_user: int = 0,
    gate: Callable[[], None] | None = None,
) -> list[RequestResult]:
    """``users`` gradio_client clients (one session each) against the app at ``url``."""

    def make_user(index: int) -> Callable[[int], RequestResult]:
        client = gradio_client_for(url)

        def request(round_: int) -> RequestResult:
            return app_request(client, question_for(questions, index, round_), persona, params, index)

        return request

    return run_users(make_user, users, rounds, first_user=first_user, gate=gate)


@contextlib.contextmanager
def running_app(engine: Engine, settings: Settings) -> Iterator[str]:
    """The real page (``build_app``) serving ``engine`` in this process; yields its URL."""
    from legal_eagle.prompts import load_prompts
    from legal_eagle.service import ModelService
    from legal_eagle.ui.app import build_app, launch_kwargs

    service = ModelService.ready_with(engine, name="bench")
    demo = build_app(service, settings, load_prompts())
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs(demo, settings))  # type: ignore[arg-type]
    try:
        yield url
    finally:
        demo.close()


ConsumerRunner = Callable[[str, Sequence[str], str, SamplingParams, int, int], list[RequestResult]]


def compare(
    engine: Engine,
    settings: Settings,
    *,
    questions: Sequence[str],
    persona: str,
    params: SamplingParams,
    levels: Sequence[int],
    rounds: dict[int, int],
    app: bool = True,
    consumers: ConsumerRunner = app_level_results,
    page: ConsumerRunner | None = page_level_results,
    page_levels: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Raw engine and app side by side at each load level.

    Args:
        engine: the loaded engine (the app serves this same object).
        settings: the app's settings (host, port, concurrency_limit...).
        questions: questions asked in turn by the users.
        persona: the system prompt both sides send.
        params: sampling settings (greedy with a fixed length gives equal work on both sides).
        levels: simultaneous users per level, e.g. (1, 8, 32).
        rounds: requests per user at each level (default 1).
        app: also measure the app (False: raw engine only).
        consumers: runs the app's users (threads here, or a child process on the GPU).
        page: runs the app's users the way the web page talks to it (None: not measured).
        page_levels: the levels at which ``page`` runs too (None: all).

    Returns:
        ``{"raw": {users: summary}, "app": {users: summary}, "page": {users: summary}}`` with str
        keys (JSON-ready).
    """
    warm = replace(params, max_new_tokens=min(8, params.max_new_tokens))
    engine_request(engine, build_messages(persona, [], questions[0]), warm)
    page = page if app else None
    out: dict[str, Any] = {"raw": {}, **({"app": {}} if app else {}), **({"page": {}} if page else {})}
    with running_app(engine, settings) if app else contextlib.nullcontext("") as url:
        if app:
            consumers(url, questions, persona, warm, 1, 1)
        for users in levels:  # raw then app at each level: any drift hits both sides alike
            out["raw"][str(users)] = raw_level(
                engine, questions, persona, params, users, rounds.get(users, 1)
            )
            log.info("raw %d users: %s", users, out["raw"][str(users)])
            if app:
                results = consumers(url, questions, persona, params, users, rounds.get(users, 1))
                out["app"][str(users)] = summarise(results, users)
                log.info("app %d users: %s", users, out["app"][str(users)])
            if page is not None and (page_levels is None or users in page_levels):
                results = page(url, questions, persona, params, users, rounds.get(users, 1))
                out["page"][str(users)] = summarise(results, users)
                log.info("page protocol %d users: %s", users, out["page"][str(users)])
    return out


def fit_text(engine: Engine, tokens: int, offset: int = 0, tag: str = "") -> str:
    """Legal-sounding text that takes about ``tokens`` tokens as a user message's content."""
    base = engine.count_tokens([{"role": "user", "content": ""}])
    pool = FILLER * (tokens // 20 + 4)
    pool = pool[offset % len(FILLER) :]

    def cost(n: int) -> int:
        return engine.count_tokens([{"role": "user", "content": tag + pool[:n]}]) - base

    lo, hi = 0, len(pool)
    while lo < hi:  # the longest prefix that fits
        mid = (lo + hi + 1) // 2
        if cost(mid) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return tag + pool[:lo]


def conversation(
    engine: Engine, persona: str, turns: int, question_tokens: int, answer_tokens: int, seed: int = 0
) -> list[list[Message]]:
    """The message lists of a ``turns``-turn chat whose history grows by a fixed size each turn.

    Each earlier answer is fixed text of about ``answer_tokens`` tokens (the engine's own
    answers would have random lengths), so turn k's prompt is turn k-1's plus one exchange.
    """
    history: list[Message] = []
    prompts: list[list[Message]] = []
    for k in range(turns):
        question = fit_text(
            engine, question_tokens, offset=7 * k + seed, tag=f"第{k + 1}个问题（会话{seed}）："
        )
        prompts.append(build_messages(persona, history, question))
        history = [
            *history,
            {"role": "user", "content": question},
            {"role": "assistant", "content": fit_text(engine, answer_tokens, offset=13 * k + seed)},
        ]
    return prompts


def chat_ttfts(
    engine: Engine, prompts: Sequence[Sequence[Message]], params: SamplingParams
) -> list[dict[str, Any]]:
    """Time to first token of each turn, asked one after another."""
    out = []
    for k, messages in enumerate(prompts):
        result = engine_request(engine, messages, params)
        out.append(
            {
                "turn": k + 1,
                "prompt_tokens": engine.count_tokens(messages),
                "ttft_ms": None if result.ttft_s is None else result.ttft_s * 1000,
            }
        )
    return out


def long_chats(
    engine: Engine,
    persona: str,
    users: int,
    prompt_tokens: int,
    params: SamplingParams,
) -> tuple[dict[str, Any], int]:
    """``users`` simultaneous chats, each with its own prompt of about ``prompt_tokens`` tokens in all.

    Returns:
        (the level's summary, the first chat's exact prompt length).
    """
    content = max(16, prompt_tokens - engine.count_tokens(build_messages(persona, [], "")))
    prompts = [
        build_messages(persona, [], fit_text(engine, content, offset=31 * i, tag=f"案件{i}："))
        for i in range(users)
    ]

    def make_user(index: int) -> Callable[[int], RequestResult]:
        return lambda round_: engine_request(engine, prompts[index], params, index)

    return summarise(run_users(make_user, users, 1), users), engine.count_tokens(prompts[0])
