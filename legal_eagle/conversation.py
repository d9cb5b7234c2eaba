"""Pure conversation logic: check a question, neutralise role markers, fit history to context.

Nothing here knows Gradio or an engine: token counting is passed in as a callable.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from legal_eagle.engines.base import Message, SamplingParams
from legal_eagle.errors import InputError

# Invisible characters that carry no meaning in a question: zero-width space/joiners,
# word joiner, BOM, soft hyphen, bidi controls.
_INVISIBLE = re.compile("[\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff\u00ad]")
# Chat-template markers of InternLM2 and the usual other families: <|im_start|>, <|im_end|>,
# <|action_start|>, <s>, </s>, [INST], <<SYS>>.
_MARKER = re.compile(r"<\|[^<>|\n]{0,40}\|>|</?s>|\[/?INST\]|<</?SYS>>", re.IGNORECASE)
_MAX_CONTROL_SHARE = 0.2


@dataclass(frozen=True)
class Trimmed:
    """Messages that fit the context, and how many earlier turns were left out."""

    messages: list[Message]
    dropped_turns: int
    prompt_tokens: int


def clean_question(text: object, max_chars: int) -> str:
    """Return the question ready to send, or raise ``InputError`` with a Chinese message.

    Normalises to NFC, removes invisible and control characters (newlines and tabs stay),
    and refuses empty, over-long or mostly-control input.
    """
    if not isinstance(text, str):
        raise InputError("问题必须是文字。", f"question is {type(text).__name__}")
    text = unicodedata.normalize("NFC", text)
    if len(text) > max_chars:
        raise InputError(
            f"问题太长了（{len(text)} 字），请控制在 {max_chars} 字以内，或分几次提问。",
            f"question has {len(text)} chars > {max_chars}",
        )
    kept = [c for c in _INVISIBLE.sub("", text) if c in "\n\t" or unicodedata.category(c)[0] != "C"]
    removed = len(text) - len(kept)
    cleaned = "".join(kept).strip()
    if not cleaned:
        if removed:
            raise InputError("问题里只有不可见的控制字符，请输入文字内容。", "only control characters")
        raise InputError("请输入您的问题。", "empty question")
    if removed / len(text) > _MAX_CONTROL_SHARE:
        raise InputError("问题中含有大量不可见的控制字符，请检查后重新输入。", f"{removed} control chars")
    return cleaned


def clean_persona(text: object) -> str:
    """Return the system prompt ready to send, or raise ``InputError`` when it is not text.

    The persona comes from the page's settings or straight from the API: it is normalised to
    NFC and loses invisible and control characters (newlines and tabs stay), including lone
    surrogates, which tokenizers and UTF-8 files cannot take. Its length is bounded by the
    context check (``trim_to_budget``).
    """
    if not isinstance(text, str):
        raise InputError("系统提示必须是文字。", f"persona is {type(text).__name__}")
    text = _INVISIBLE.sub("", unicodedata.normalize("NFC", text))
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C").strip()


def neutralise_markers(text: str) -> str:
    """Make chat-template markers in user text harmless by turning their brackets full-width.

    ``<|im_end|>`` becomes ``＜|im_end|＞``: still readable, never a special token, for
    any engine (TurboMind and transformers also encode user text with special-token
    splitting; this covers engines that take text, such as a remote server).
    """
    return _MARKER.sub(lambda m: m.group(0).replace("<", "＜").replace(">", "＞")
                       .replace("[", "［").replace("]", "］"), text)


def validate_sampling(
    *,
    max_new_tokens: object,
    temperature: object,
    top_p: object,
    repetition_penalty: object,
    greedy: object = False,
    seed: object = None,
    max_new_tokens_cap: int,
) -> SamplingParams:
    """Check sampling values that may come straight from the API; raise ``InputError`` if off."""
    max_tokens = _number("最大生成长度", max_new_tokens, 1, max_new_tokens_cap, integer=True)
    temp = _number("温度 (temperature)", temperature, 0.0, 2.0)
    nucleus = _number("top_p", top_p, 0.01, 1.0)
    penalty = _number("重复惩罚 (repetition penalty)", repetition_penalty, 1.0, 2.0)
    seed_value = None if seed in (None, "", -1) else int(_number("随机种子", seed, 0, 2**31 - 1, integer=True))
    return SamplingParams(
        max_new_tokens=int(max_tokens),
        temperature=temp,
        top_p=nucleus,
        repetition_penalty=penalty,
        greedy=bool(greedy) or temp == 0.0,
        seed=seed_value,
    )


def build_messages(system: str, history: Sequence[Message], question: str) -> list[Message]:
    """System prompt, earlier turns and the new question, markers neutralised in user text."""
    messages: list[Message] = [{"role": "system", "content": system}] if system.strip() else []
    for message in history:
        content = neutralise_markers(message["content"]) if message["role"] == "user" else message["content"]
        messages.append({"role": message["role"], "content": content})
    messages.append({"role": "user", "content": neutralise_markers(question)})
    return messages


def trim_to_budget(
    messages: Sequence[Message], count_tokens: Callable[[Sequence[Message]], int], budget: int
) -> Trimmed:
    """Drop the oldest turns until the prompt fits ``budget`` tokens.

    The system prompt and the last message (the new question) are never dropped; earlier
    messages go oldest first, a user question together with the answers that follow it.

    Raises:
        InputError: even the system prompt and the question alone do not fit.
    """
    head = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    body = list(messages[len(head):-1])
    last = [messages[-1]]
    dropped = 0
    while True:
        candidate = head + body + last
        tokens = count_tokens(candidate)
        if tokens <= budget:
            return Trimmed(messages=candidate, dropped_turns=dropped, prompt_tokens=tokens)
        if not body:
            raise InputError(
                "问题加上系统提示已超出模型可处理的长度，请缩短问题或减小“最大生成长度”。",
                f"prompt {tokens} tokens > budget {budget}",
            )
        body = _drop_first_turn(body)
        dropped += 1


def _drop_first_turn(body: list[Message]) -> list[Message]:
    """Remove the first message and any assistant replies right after it."""
    rest = body[1:]
    while rest and rest[0]["role"] == "assistant":
        rest = rest[1:]
    return rest


def _number(label: str, value: object, low: float, high: float, integer: bool = False) -> float:
    """Parse a numeric setting within ``[low, high]`` or raise ``InputError``."""
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{label} 必须是数字。", f"{label}={value!r}") from None
    if number != number or not low <= number <= high or (integer and number != int(number)):
        kind = "整数" if integer else "数值"
        raise InputError(f"{label} 必须是 {low:g} 到 {high:g} 之间的{kind}，收到的是 {value}。",
                         f"{label}={value!r}")
    return number
