"""Static knowledge about law names: common abbreviations and well-known repealed laws."""

from __future__ import annotations

import re

PRC_PREFIX = "中华人民共和国"

ABBREVIATIONS: dict[str, str] = {
    "民诉法": "民事诉讼法",
    "刑诉法": "刑事诉讼法",
    "行诉法": "行政诉讼法",
    "劳动争议仲裁法": "劳动争议调解仲裁法",
    "消法": "消费者权益保护法",
    "消保法": "消费者权益保护法",
    "消费者保护法": "消费者权益保护法",
    "个保法": "个人信息保护法",
    "道交法": "道路交通安全法",
    "道路交通法": "道路交通安全法",
    "治安处罚法": "治安管理处罚法",
    "未保法": "未成年人保护法",
    "妇女权益保护法": "妇女权益保障法",
    "老年人权益保护法": "老年人权益保障法",
    "食安法": "食品安全法",
    "土地承包法": "农村土地承包法",
    "房地产管理法": "城市房地产管理法",
    "破产法": "企业破产法",
}
"""Short or colloquial names people write, mapped to the corpus's short title."""

REPEALED: dict[str, str] = {
    name: "已于2021年1月1日废止，相关规定见《中华人民共和国民法典》"
    for name in ("合同法", "物权法", "婚姻法", "继承法", "侵权责任法", "民法通则", "民法总则", "担保法",
                 "收养法")
}
REPEALED.update({
    "劳动教养条例": "劳动教养制度已于2013年废止",
    "经济合同法": "已于1999年10月1日废止，由原《合同法》取代（现为《中华人民共和国民法典》合同编）",
})
"""Real laws that are no longer in force, with a Chinese note on what replaced them."""

CODE_PARTS = ("总则编", "物权编", "合同编", "人格权编", "婚姻家庭编", "继承编", "侵权责任编",
              "通则分编", "典型合同分编", "准合同分编", "总则", "分则")
"""Part names that may sit between a code's name and an article number (民法典合同编第五百七十七条)."""

_VERSION_NOTE = re.compile(r"[（(]\s*\d{4}\s*年?\s*(?:修正|修订|修改|版)?\s*[)）]$")
_PART_SUFFIX = re.compile(
    r"(?:" + "|".join(CODE_PARTS) + r"|第[零〇一二两三四五六七八九十百千0-9]+(?:编|分编|章|节))$")


def strip_parts(name: str) -> str:
    """Drop trailing code parts, chapters and sections: 民法典合同编 → 民法典, 刑法第二编第五章 → 刑法."""
    previous = None
    while previous != name:
        previous = name
        name = _PART_SUFFIX.sub("", name).rstrip("的 ")
    return name


def short_name(name: str) -> str:
    """The comparable short form of a law name as written in a text.

    Strips 《》 marks, spaces, a trailing version note such as （2018年修正）, the 中华人民共和国
    prefix and code parts, then applies the abbreviation table.

    Args:
        name: the name as it appears, e.g. ``"《中华人民共和国民事诉讼法》"`` or ``"民诉法"``.

    Returns:
        The short name, e.g. ``"民事诉讼法"``.
    """
    name = re.sub(r"\s+", "", name).strip("《》〈〉<>")
    name = _VERSION_NOTE.sub("", name)
    if name.startswith(PRC_PREFIX) and len(name) > len(PRC_PREFIX):
        name = name[len(PRC_PREFIX):]
    name = strip_parts(name) or name
    return ABBREVIATIONS.get(name, name)
