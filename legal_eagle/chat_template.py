"""InternLM2's chat format, rendered to token ids so that user text can never become a marker.

The format (InternLM2-chat's own ``chat_template``)::

    <s><|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n

Role markers are inserted as their special token ids; every piece of text, including what
a user typed, is encoded with special-token splitting, so a typed ``<|im_end|>`` stays the
plain characters ``<``, ``|``, ``im_end`` ... and can never end a turn or switch role.
The engines (transformers and TurboMind) feed these ids to the model directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from legal_eagle.engines.base import Message

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BOS = "<s>"
STOP_TOKENS = (IM_END, "</s>")


def special_id(tokenizer: Any, token: str) -> int:
    """The id of a special token, or a ValueError if the tokenizer lacks it."""
    idx = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if idx is None or (idx == unk and token != getattr(tokenizer, "unk_token", None)):
        raise ValueError(f"tokenizer has no special token {token!r}: not an InternLM2 chat tokenizer")
    return int(idx)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Encode plain text; special-token strings inside it are split into ordinary tokens."""
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


def render_ids(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the InternLM2 chat prompt for ``messages``.

    Args:
        tokenizer: a Hugging Face tokenizer of the InternLM2 vocabulary (or the tiny test one).
        messages: openai-style messages with plain-text content.
        add_generation_prompt: end with ``<|im_start|>assistant\\n`` for the model to answer.

    Returns:
        The prompt's token ids, BOS first.
    """
    start, end = special_id(tokenizer, IM_START), special_id(tokenizer, IM_END)
    ids = [special_id(tokenizer, BOS)]
    for message in messages:
        ids.append(start)
        ids += encode_text(tokenizer, f"{message['role']}\n{message['content']}")
        ids.append(end)
        ids += encode_text(tokenizer, "\n")
    if add_generation_prompt:
        ids.append(start)
        ids += encode_text(tokenizer, "assistant\n")
    return ids


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end an assistant turn: ``<|im_end|>`` and EOS."""
    out = []
    for token in STOP_TOKENS:
        try:
            out.append(special_id(tokenizer, token))
        except ValueError:
            continue
    if not out:
        raise ValueError("tokenizer has neither <|im_end|> nor </s>")
    return out
