"""Chinese and Arabic numerals as they appear in article numbers (第三十八条, 第38条, 第一百三十三条之一)."""

from __future__ import annotations

DIGITS = {"零": 0, "〇": 0, "○": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5,
          "六": 6, "七": 7, "八": 8, "九": 9}
UNITS = {"十": 10, "百": 100, "千": 1000, "万": 10000}
CN_NUMERAL_CHARS = "".join(DIGITS) + "".join(UNITS)
NUM_PATTERN = r"[0-9０-９]+|[零〇○一二两三四五六七八九十百千万]+"
"""Regex for one number in either script (used inside the citation grammar)."""

_FULLWIDTH = str.maketrans("０１２３４５６７８９", "0123456789")
_CN_DIGITS = "零一二三四五六七八九"


def cn_to_int(text: str) -> int:
    """Value of a Chinese numeral such as 一千二百六十, 二百零四, 十二 or 一〇八.

    Args:
        text: the numeral, Chinese characters only.

    Returns:
        Its integer value.

    Raises:
        ValueError: ``text`` is empty or holds a character that is not a Chinese numeral.
    """
    if not text or any(ch not in DIGITS and ch not in UNITS for ch in text):
        raise ValueError(f"not a Chinese numeral: {text!r}")
    if not any(ch in UNITS for ch in text):  # positional form: 一〇八
        return int("".join(str(DIGITS[ch]) for ch in text))
    total, section, number = 0, 0, 0
    for ch in text:
        if ch in DIGITS:
            number = DIGITS[ch]
            continue
        unit = UNITS[ch]
        if unit == 10000:
            total += (section + number) * unit
            section, number = 0, 0
            continue
        if number == 0 and unit == 10:  # 十二 = 12, 二百十 = 210
            number = 1
        section += number * unit
        number = 0
    return total + section + number


def parse_number(text: str) -> int:
    """Value of an article, paragraph or item number written in Chinese or (full-width) Arabic digits.

    Args:
        text: e.g. ``"三十八"``, ``"38"`` or ``"３８"``.

    Returns:
        The integer value.

    Raises:
        ValueError: ``text`` is not a number in either script.
    """
    text = text.strip()
    ascii_digits = text.translate(_FULLWIDTH)
    if ascii_digits.isdigit():
        return int(ascii_digits)
    return cn_to_int(text)


def int_to_cn(value: int) -> str:
    """The Chinese numeral the statute books use: 38 → 三十八, 204 → 二百零四, 10 → 十, 110 → 一百一十.

    Args:
        value: an integer from 0 to 99999.

    Returns:
        The numeral in Chinese characters.

    Raises:
        ValueError: ``value`` is outside 0-99999.
    """
    if not 0 <= value <= 99999:
        raise ValueError(f"int_to_cn supports 0-99999, got {value}")
    if value == 0:
        return "零"
    if 10 <= value < 20:
        return "十" + (_CN_DIGITS[value - 10] if value > 10 else "")
    out: list[str] = []
    zero_pending = False
    for unit_value, unit in ((10000, "万"), (1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit = value // unit_value % 10
        if digit == 0:
            if out:
                zero_pending = True
            continue
        if zero_pending:
            out.append("零")
            zero_pending = False
        out.append(_CN_DIGITS[digit] + unit)
    return "".join(out)


def article_label(num: int, sub: int = 0) -> str:
    """The canonical label of an article: ``article_label(133, 1) == "第一百三十三条之一"``."""
    label = f"第{int_to_cn(num)}条"
    return label + (f"之{int_to_cn(sub)}" if sub else "")
