"""``RunningAnswers``: a stop closes the engine stream of the session's answer at once when its
handler is not inside it, and otherwise right after the chunk the handler is waiting for."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from legal_eagle.engines.base import Chunk
from legal_eagle.ui.stops import RunningAnswers


class Stream:
    """An engine stream whose closing is seen (``closed``) and whose next chunk can be held back."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.waiting = threading.Event()
        self.sent = 0

    def chunks(self) -> Iterator[Chunk]:
        try:
            while True:
                self.waiting.set()
                self.release.wait(5)
                self.waiting.clear()
                self.sent += 1
                yield Chunk("字", self.sent)
        finally:
            self.closed.set()


def test_a_stop_closes_a_waiting_handlers_stream_at_once_and_its_session_only() -> None:
    answers = RunningAnswers()
    mine, theirs = Stream(), Stream()
    with answers.running("tab-a") as a, answers.running("tab-b") as b:
        my_chunks, their_chunks = a.follow(mine.chunks()), b.follow(theirs.chunks())
        next(my_chunks), next(their_chunks)  # both handlers now wait at a yield (as after a lost cancel)
        assert answers.stop("tab-a") == 1
        assert mine.closed.is_set() and not theirs.closed.is_set()
        assert list(my_chunks) == []  # iterated again, the stopped answer just ends
        assert next(their_chunks).n_tokens == 2
        assert answers.stop("nobody") == 0 and answers.stop(None) == 0
    assert theirs.closed.is_set() and answers.sessions() == 0  # leaving the block closes every stream


def test_a_stop_during_a_pull_closes_the_stream_after_that_chunk_though_the_handler_never_resumes() -> None:
    """The handler is inside the engine's generator when the stop comes, gets its chunk, hands it to
    Gradio at a yield and is never resumed (a cancel): the stream is closed all the same, after the
    pull and not under it (GPU machine, 2026-12-04: lost when a stop only set the flag)."""
    answers = RunningAnswers()
    stream = Stream()
    got: list[int] = []
    with answers.running("tab-a") as answer:
        stream.release.clear()
        chunks = answer.follow(stream.chunks())
        handler = threading.Thread(target=lambda: got.append(next(chunks).n_tokens))  # one pull, never resumed
        handler.start()
        assert stream.waiting.wait(5)  # the handler is inside the engine's generator
        stopper = threading.Thread(target=answers.stop, args=("tab-a",))
        stopper.start()
        time.sleep(0.1)
        assert not stream.closed.is_set()  # not closed under a running pull
        stream.release.set()
        handler.join(5)
        stopper.join(5)
        assert got == [1] and stream.closed.is_set() and not stopper.is_alive()
        assert list(chunks) == []  # resumed after all, it just ends


def test_a_stop_during_a_pull_lets_a_resumed_handler_end_after_that_chunk() -> None:
    answers = RunningAnswers()
    stream = Stream()
    got: list[int] = []
    errors: list[BaseException] = []
    with answers.running("tab-a") as answer:
        stream.release.clear()

        def handler() -> None:
            try:
                got.extend(c.n_tokens for c in answer.follow(stream.chunks()))
            except BaseException as exc:  # "generator already executing" if stop closed it under the pull
                errors.append(exc)

        thread = threading.Thread(target=handler)
        thread.start()
        assert stream.waiting.wait(5)
        stopper = threading.Thread(target=answers.stop, args=("tab-a",))
        stopper.start()
        stream.release.set()
        thread.join(5)
        stopper.join(5)
    assert not thread.is_alive() and errors == []
    assert got == [1] and stream.closed.is_set()  # the chunk in flight, then the end


def test_a_stop_before_the_stream_starts_means_it_never_runs() -> None:
    answers = RunningAnswers()
    stream = Stream()
    with answers.running("tab-a") as answer:
        answers.stop("tab-a")
        assert list(answer.follow(stream.chunks())) == [] and stream.sent == 0
