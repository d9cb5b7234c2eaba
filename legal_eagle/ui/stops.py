"""Stopping a running answer from outside its handler.

Gradio stops a streaming handler by closing its generator after a cancel (the page's Stop,
gradio_client's ``job.cancel()``, a client that goes away). A handler waiting at a ``yield``
cannot see anything else, and on the GPU machine that close did not come for gradio_client's
cancel (docs/reliability.md). So each running answer is registered here under its Gradio
session, and a stop — the Stop button's handler, the ``/stop`` API, Gradio's ``/cancel`` or a
dropped event stream seen by ``cancel_watch`` — sets the answer's flag *and* closes its engine
stream — at once, or right after the chunk the handler is pulling — so the engine aborts the
generation and frees its slot (``Engine.stream``'s contract), whether Gradio ever resumes or
closes the handler or not. A stream is never closed under a running pull.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from legal_eagle.engines.base import Chunk

log = logging.getLogger(__name__)
STOP_WAIT_S = 30.0  # how long a stop waits for the chunk being pulled (TurboMind: milliseconds)


class RunningAnswer:
    """One answer's stop flag and engine stream; every pull and the close go through one lock."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._stream: Iterator[Chunk] | None = None

    def follow(self, stream: Iterator[Chunk]) -> Iterator[Chunk]:
        """Hold ``stream`` from now on (a stop closes it even before the first pull); its chunks until
        it ends or the answer is stopped (the stream is then closed)."""
        with self._lock:
            self._stream = stream
            if self.stopped.is_set():
                self._close_locked()
        return self._pull()

    def _pull(self) -> Iterator[Chunk]:
        while True:
            with self._lock:
                if self.stopped.is_set() or self._stream is None:
                    self._close_locked()
                    return
                try:
                    chunk = next(self._stream)
                except StopIteration:
                    return
            yield chunk

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """Stop the answer and close its engine stream, after the chunk being pulled if there is one.

        Waiting for that pull matters: the handler may hand its chunk to Gradio at a ``yield`` that
        a cancel never resumes (the GPU machine, 2026-12-04: 1 of 2 gradio_client cancels lost when
        this only set the flag), so nobody else would close the stream.
        """
        self.stopped.set()
        if self._lock.acquire(timeout=wait_s):
            try:
                self._close_locked()
            finally:
                self._lock.release()
        else:
            log.warning("a stopped answer's engine gave no chunk for %.0f s; it ends at its next chunk", wait_s)

    def close(self) -> None:
        """Close the engine stream (once; waits for a pull in progress)."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        stream, self._stream = self._stream, None
        close = getattr(stream, "close", None)
        if close is not None:
            close()


class RunningAnswers:
    """The running answers by Gradio session (one browser tab, one gradio_client ``Client``)."""

    def __init__(self) -> None:
        self._by_session: dict[str, set[RunningAnswer]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def running(self, session: str | None) -> Iterator[RunningAnswer]:
        """A new answer, findable by its session until the block ends (its stream is then closed)."""
        answer = RunningAnswer()
        if session is not None:
            with self._lock:
                self._by_session.setdefault(session, set()).add(answer)
        try:
            yield answer
        finally:
            if session is not None:
                with self._lock:
                    answers = self._by_session.get(session, set())
                    answers.discard(answer)
                    if not answers:
                        self._by_session.pop(session, None)
            answer.close()

    def stop(self, session: str | None) -> int:
        """Stop every running answer of ``session`` (waits for chunks being pulled); how many there were."""
        with self._lock:
            answers = list(self._by_session.get(session, ())) if session is not None else []
        for answer in answers:
            try:
                answer.stop()
            except Exception:  # an engine's close failing must not fail the Stop (or Gradio's /cancel)
                log.exception("closing a stopped answer's engine stream failed")
        return len(answers)

    def sessions(self) -> int:
        """How many sessions have an answer running."""
        with self._lock:
            return len(self._by_session)
