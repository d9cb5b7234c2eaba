"""AWQ calibration data that needs no hub: Chinese legal Q&A in the chat format the app uses.

The default text ships in ``prompts/calibration_zh_legal.txt``: question/answer pairs (``问：``
/ ``答：``, separated by blank lines). Each pair is rendered as a whole InternLM2 chat turn
(persona, question, answer) so the activation statistics AWQ collects come from the tokens
the deployed model actually sees; the ids are concatenated and cut into equal chunks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

CalibSource = Literal["builtin", "file", "none"]
BUILTIN_PATH = Path(__file__).resolve().parent.parent / "prompts" / "calibration_zh_legal.txt"
PERSONA = "您是一个专业的律师，用户会对您提出法律方面的问题，请您根据您的知识进行专业、准确的回答。"


@dataclass(frozen=True)
class CalibrationSpec:
    """Where AWQ's calibration text comes from and how it is cut.

    Attributes:
        source: "builtin" (the shipped Chinese legal Q&A), "file" (``path``, UTF-8 text) or
            "none" (data-free AWQ: no activation statistics, plain round-to-nearest 4-bit).
        path: the text file for source="file".
        max_samples: at most this many chunks (1..1024).
        seqlen: tokens per chunk (16..8192).
    """

    source: CalibSource = "builtin"
    path: Path | None = None
    max_samples: int = 128
    seqlen: int = 512

    def __post_init__(self) -> None:
        if self.source not in ("builtin", "file", "none"):
            raise ValueError(f"calibration source must be builtin, file or none, not {self.source!r}")
        if self.source == "file" and self.path is None:
            raise ValueError("calibration source 'file' needs a path")
        if not 1 <= self.max_samples <= 1024:
            raise ValueError(f"calibration max_samples must be in 1..1024, got {self.max_samples}")
        if not 16 <= self.seqlen <= 8192:
            raise ValueError(f"calibration seqlen must be in 16..8192, got {self.seqlen}")

    def text_path(self) -> Path | None:
        """The text file this spec reads (None for data-free)."""
        return {"builtin": BUILTIN_PATH, "file": self.path, "none": None}[self.source]

    def describe(self) -> dict[str, Any]:
        """Manifest entry: source, file and its sha256, sample shape."""
        path = self.text_path()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path else None
        return {"source": self.source, "file": str(path) if path else None, "sha256": digest,
                "max_samples": self.max_samples, "seqlen": self.seqlen}


def split_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of a 问：/答： text; a block without 答： counts as plain text."""
    pairs: list[tuple[str, str]] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        block = block.strip()
        if not block:
            continue
        q, sep, a = block.partition("答：")
        if sep:
            pairs.append((q.removeprefix("问：").strip(), a.strip()))
        else:
            pairs.append(("", block))
    return pairs


def calibration_ids(tokenizer: Any, text: str) -> list[int]:
    """All token ids of the calibration text, each pair rendered as one chat exchange."""
    from legal_eagle.chat_template import encode_text, render_ids

    ids: list[int] = []
    for question, answer in split_pairs(text):
        if not question:
            ids += encode_text(tokenizer, answer)
            continue
        msgs = [{"role": "system", "content": PERSONA}, {"role": "user", "content": question},
                {"role": "assistant", "content": answer}]
        ids += render_ids(tokenizer, msgs, add_generation_prompt=False)  # type: ignore[arg-type]
    return ids


def build_samples(tokenizer: Any, spec: CalibrationSpec) -> list[Any]:
    """``LongTensor[1, seqlen]`` chunks for AWQ; [] for data-free.

    Args:
        tokenizer: the tokenizer of the model to quantize.
        spec: what text to use and how to cut it.

    Returns:
        Up to ``spec.max_samples`` equal-length chunks (the tail shorter than seqlen is dropped).

    Raises:
        ValueError: the text gives fewer than ``spec.seqlen`` tokens.
    """
    import torch

    path = spec.text_path()
    if path is None:
        return []
    ids = calibration_ids(tokenizer, path.read_text(encoding="utf-8"))
    n = min(spec.max_samples, len(ids) // spec.seqlen)
    if n == 0:
        raise ValueError(f"calibration text {path} has {len(ids)} tokens, fewer than seqlen={spec.seqlen}")
    return [torch.tensor([ids[i * spec.seqlen:(i + 1) * spec.seqlen]], dtype=torch.long) for i in range(n)]
