"""The transformers engine: CPU (or any torch device) fallback where TurboMind cannot run.

It loads a Llama-format checkpoint (InternLM2 checkpoints are converted first by
``legal_eagle.convert``, since transformers 5 has no InternLM2 class), renders the
prompt with ``chat_template.render_ids`` and streams with ``TextIteratorStreamer`` from a
generation thread. Closing the stream sets a stop flag that a ``StoppingCriteria`` checks
after every token, so the thread ends within one decoding step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legal_eagle.chat_template import render_ids, stop_token_ids
from legal_eagle.engines.base import Chunk, EngineInfo, Message, SamplingParams
from legal_eagle.errors import EngineError

log = logging.getLogger(__name__)
_STREAM_TIMEOUT_S = 600.0


@dataclass
class _Generation:
    """Book-keeping of one running ``generate`` call."""

    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    tokens: int = 0
    last_token: int | None = None


class TransformersEngine:
    """Streams answers from a Hugging Face causal LM."""

    def __init__(self, model: Any, tokenizer: Any, info: EngineInfo) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._info = info
        self._stop_ids = stop_token_ids(tokenizer)
        self._active = 0
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: Path, *, device: str = "auto", context_len: int = 8192,
             name: str = "transformers") -> TransformersEngine:
        """Load a Llama-format checkpoint.

        Args:
            model_dir: folder with config.json, weights and tokenizer.
            device: "cpu", "cuda", or "auto" (cuda when available).
            context_len: the context window the app allows (prompt + answer).
            name: label shown in the UI.

        Returns:
            The ready engine.

        Raises:
            EngineError: the checkpoint cannot be loaded.
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise EngineError("模型文件无法加载，请检查模型目录是否完整。", f"load {model_dir}: {exc}") from exc
        info = EngineInfo(name=name, backend="transformers", model_path=str(model_dir), model_format="hf",
                          quantization=str(dtype).removeprefix("torch."), context_len=context_len,
                          extra={"device": device})
        log.info("transformers engine ready: %s on %s (%s)", model_dir, device, info.quantization)
        return cls(model, tokenizer, info)

    @property
    def info(self) -> EngineInfo:
        """What is loaded."""
        return self._info

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Exact prompt length with the chat template."""
        return len(render_ids(self._tokenizer, messages))

    def stream(self, messages: Sequence[Message], params: SamplingParams) -> Iterator[Chunk]:
        """Stream an answer; closing the generator stops generation."""
        ids = render_ids(self._tokenizer, messages)
        return self._stream(ids, params)

    def _stream(self, ids: list[int], params: SamplingParams) -> Iterator[Chunk]:
        """Run ``generate`` in a thread and relay its text."""
        from transformers import TextIteratorStreamer

        gen = _Generation()
        engine = self

        class _CountingStreamer(TextIteratorStreamer):
            def put(self, value: Any) -> None:
                if not self.next_tokens_are_prompt:
                    gen.tokens += int(value.numel())
                    gen.last_token = int(value.reshape(-1)[-1])
                super().put(value)

        streamer = _CountingStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True,
                                     timeout=_STREAM_TIMEOUT_S)
        thread = threading.Thread(target=self._generate, args=(ids, params, streamer, gen), daemon=True,
                                  name="transformers-generate")
        with self._lock:
            self._active += 1
        try:
            thread.start()
            for text in streamer:
                if text:
                    yield Chunk(text=text, n_tokens=gen.tokens)
            thread.join()
            if gen.error is not None:
                raise EngineError("模型生成时出错，请重试或缩短问题。", repr(gen.error)) from gen.error
            yield Chunk(text="", n_tokens=gen.tokens, finish_reason=engine._finish_reason(gen, params))
        finally:
            gen.stop.set()
            thread.join(timeout=_STREAM_TIMEOUT_S)
            with self._lock:
                self._active -= 1

    def _finish_reason(self, gen: _Generation, params: SamplingParams) -> str:
        """``stop`` when a stop token ended the answer, else ``length``."""
        if gen.last_token in self._stop_ids or gen.tokens < params.max_new_tokens:
            return "stop"
        return "length"

    def _generate(self, ids: list[int], params: SamplingParams, streamer: Any, gen: _Generation) -> None:
        """Thread body: ``model.generate`` with a stop flag; errors are handed to the consumer."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _StopFlag(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), gen.stop.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        sampling: dict[str, Any] = {"do_sample": not params.greedy}
        if not params.greedy:
            sampling.update(temperature=params.temperature, top_p=params.top_p)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        try:
            with torch.inference_mode():
                self._model.generate(
                    torch.tensor([ids], device=self._model.device),
                    attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=self._model.device),
                    max_new_tokens=params.max_new_tokens,
                    repetition_penalty=params.repetition_penalty,
                    eos_token_id=self._stop_ids,
                    pad_token_id=self._stop_ids[0],
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopFlag()]),
                    **sampling,
                )
        except Exception as exc:  # handed to the consumer thread as an EngineError
            gen.error = exc
            streamer.end()

    def active_generations(self) -> int:
        """Streams running now."""
        with self._lock:
            return self._active

    def gpu_memory_bytes(self) -> int | None:
        """CUDA memory torch holds for this process (None on CPU)."""
        import torch

        if self._info.extra.get("device", "cpu") == "cpu" or not torch.cuda.is_available():
            return None
        return int(torch.cuda.memory_allocated())

    def close(self) -> None:
        """Drop the model."""
        self._model = None
