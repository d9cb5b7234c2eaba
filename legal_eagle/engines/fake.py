"""A scripted engine that records its calls: the shipped fake for tests and UI work.

It behaves like a real engine where the app can tell: it streams, counts tokens (one per
character), honours ``max_new_tokens``, frees its slot when the stream is closed, and can
be told to fail mid-answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from legal_eagle.engines.base import Chunk, EngineInfo, Message, SamplingParams
from legal_eagle.errors import EngineError

Script = Callable[[Sequence[Message], SamplingParams], str]


def echo_script(messages: Sequence[Message], params: SamplingParams) -> str:
    """Default script: a lawyer-like answer that quotes the question (handy in UI tests)."""
    question = messages[-1]["content"]
    turn = sum(1 for m in messages if m["role"] == "user")
    return (f"【测试回答 第{turn}轮】您的问题是：“{question}”。根据《中华人民共和国劳动合同法》第三十八条，"
            "用人单位未及时足额支付劳动报酬的，劳动者可以解除劳动合同。")


@dataclass
class Call:
    """One recorded ``stream`` call."""

    messages: list[Message]
    params: SamplingParams
    finish_reason: str | None = None
    tokens: int = 0


@dataclass
class FakeEngine:
    """Scripted engine.

    Attributes:
        script: returns the full answer for a prompt; it is streamed one character a chunk.
        delay_s: pause before each chunk (lets tests stop an answer mid-stream).
        fail_after: raise ``EngineError`` after this many chunks (None: never).
        context_len: the context window reported in ``info``.
    """

    script: Script = echo_script
    delay_s: float = 0.0
    fail_after: int | None = None
    context_len: int = 4096
    name: str = "fake"
    calls: list[Call] = field(default_factory=list)
    _active: int = 0
    peak_active: int = 0  # most streams open at once (tests check real concurrency with it)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def info(self) -> EngineInfo:
        """Describes the fake as such."""
        return EngineInfo(name=self.name, backend="fake", model_path="(scripted)", model_format="hf",
                          quantization="fake", context_len=self.context_len)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """One token per character plus four per message for the markers."""
        return sum(len(m["content"]) + 4 for m in messages) + 3

    def stream(self, messages: Sequence[Message], params: SamplingParams) -> Iterator[Chunk]:
        """Stream the scripted answer one character at a time."""
        call = Call(messages=[dict(m) for m in messages], params=params)  # type: ignore[misc]
        with self._lock:
            self.calls.append(call)
        return self._generate(call)

    def _generate(self, call: Call) -> Iterator[Chunk]:
        """The generator behind ``stream``; its ``finally`` frees the slot like a real abort."""
        answer = self.script(call.messages, call.params)
        with self._lock:
            self._active += 1
            self.peak_active = max(self.peak_active, self._active)
        call.finish_reason = "abort"
        try:
            for i, char in enumerate(answer[: call.params.max_new_tokens]):
                if self.fail_after is not None and i >= self.fail_after:
                    call.finish_reason = "error"
                    raise EngineError("模型生成时出错，请重试。", "fake engine failure (scripted)")
                if self.delay_s:
                    time.sleep(self.delay_s)
                call.tokens = i + 1
                yield Chunk(text=char, n_tokens=i + 1)
            reason = "length" if len(answer) > call.params.max_new_tokens else "stop"
            call.finish_reason = reason
            yield Chunk(text="", n_tokens=call.tokens, finish_reason=reason)
        finally:
            with self._lock:
                self._active -= 1

    def active_generations(self) -> int:
        """Streams started and not yet finished or closed."""
        with self._lock:
            return self._active

    def gpu_memory_bytes(self) -> int | None:
        """The fake holds no GPU memory."""
        return None

    def close(self) -> None:
        """Nothing to release."""
