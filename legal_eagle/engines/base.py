"""The one engine protocol every backend implements (fake, transformers, turbomind).

Engines are stateless: the whole openai-style message list goes in on every call, and the
per-user history lives in the UI's state. ``stream`` returns a generator of ``Chunk``;
closing that generator (``gen.close()``, which Gradio's cancel and a client disconnect
cause) aborts the generation in the engine and frees its slot.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, TypedDict, runtime_checkable

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "abort", "error"]


class Message(TypedDict):
    """One openai-style chat message with plain-text content."""

    role: Role
    content: str


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings, already validated (see ``conversation.validate_sampling``).

    ``greedy`` forces deterministic decoding regardless of temperature and top_p.
    """

    max_new_tokens: int = 1024
    temperature: float = 0.7
    top_p: float = 0.8
    repetition_penalty: float = 1.005
    greedy: bool = False
    seed: int | None = None

    def as_dict(self) -> dict[str, object]:
        """The settings as a plain dict (for exports and logs)."""
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    """One step of a streamed answer.

    Attributes:
        text: newly generated text since the previous chunk (may be empty).
        n_tokens: output tokens generated so far in this answer.
        finish_reason: set on the last chunk only.
    """

    text: str
    n_tokens: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class EngineInfo:
    """What an engine is, for the status line, exports and the compare tab."""

    name: str
    backend: str
    model_path: str
    model_format: str  # "hf" (fp16/bf16/fp32 weights) or "awq" (4-bit)
    quantization: str  # human-readable: "fp16", "AWQ W4A16 g128", "fake"
    context_len: int
    extra: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A chat model that streams answers and can be stopped."""

    @property
    def info(self) -> EngineInfo:
        """Static description of the loaded model."""
        ...

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens the prompt for ``messages`` takes, generation prompt included."""
        ...

    def stream(self, messages: Sequence[Message], params: SamplingParams) -> Iterator[Chunk]:
        """Generate the assistant's answer to ``messages``.

        Args:
            messages: system, user and assistant turns, the new question last.
            params: validated sampling settings.

        Returns:
            A generator of chunks; the last one carries ``finish_reason``. Closing the
            generator early aborts the generation and frees its engine slot.

        Raises:
            EngineError: when the engine fails; the message is fit for the user.
        """
        ...

    def active_generations(self) -> int:
        """How many generations are running right now (0 when idle)."""
        ...

    def gpu_memory_bytes(self) -> int | None:
        """GPU memory this engine holds, or None when it holds none or cannot tell."""
        ...

    def close(self) -> None:
        """Release the model and its memory."""
        ...
