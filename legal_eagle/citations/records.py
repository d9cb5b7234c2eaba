"""The values the statute base hands out: articles and citation checks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from legal_eagle.citations.numerals import article_label, int_to_cn
from legal_eagle.citations.parser import Citation

Status = Literal["found", "no_part", "no_article", "unknown_law"]
"""found: the article exists; no_part: it exists but lacks the cited 款/项; no_article: the law
exists but not that article; unknown_law: the base has no law of that name."""

_ITEM = re.compile(r"^[（(][一二三四五六七八九十]+[)）]")


@dataclass(frozen=True)
class Article:
    """One statute article with its law's title and version date.

    ``text`` starts with the article's label (``第三十八条 ……``); paragraphs are separated by
    newlines, as in the source.
    """

    law_title: str
    law_short: str
    version_date: str
    num: int
    sub: int
    chapter: str
    text: str

    @property
    def label(self) -> str:
        """e.g. 第一百三十三条之一."""
        return article_label(self.num, self.sub)

    @property
    def citation(self) -> str:
        """e.g. 《中华人民共和国劳动合同法》第三十八条."""
        return f"《{self.law_title}》{self.label}"

    def paragraphs(self) -> list[list[str]]:
        """The article's 款 (paragraphs), each as [lead line, item lines (（一）…)...]."""
        body = self.text[len(self.label):].strip()
        kuan: list[list[str]] = []
        for line in body.split("\n"):
            if _ITEM.match(line) and kuan:
                kuan[-1].append(line)
            else:
                kuan.append([line])
        return kuan

    def part(self, kuan: int | None, xiang: int | None) -> str | None:
        """The text of 第kuan款 (第xiang项), '' when nothing narrower was cited, None when it does not exist.

        Args:
            kuan: 1-based paragraph number, or None (then the first paragraph's items are used for xiang).
            xiang: 1-based item number, or None.

        Returns:
            The excerpt, ``""`` if neither is given, or None if the article has no such part.
        """
        if kuan is None and xiang is None:
            return ""
        paras = self.paragraphs()
        index = (kuan or 1) - 1
        if not 0 <= index < len(paras):
            return None
        para = paras[index]
        if xiang is None:
            return "\n".join(para)
        items = para[1:]
        if not 1 <= xiang <= len(items):
            return None
        return items[xiang - 1]


@dataclass(frozen=True)
class CitationCheck:
    """The verdict on one cited article.

    ``law_title``/``version_date`` are set whenever the law was found; ``article`` when the
    article was; ``excerpt`` is the cited 款/项 text; ``note`` explains a problem in Chinese.
    """

    citation: Citation
    status: Status
    law_title: str | None = None
    version_date: str | None = None
    article: Article | None = None
    excerpt: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        """True only when the article (and any cited 款/项) exists."""
        return self.status == "found"

    @property
    def display(self) -> str:
        """How the citation reads in the panel: 《劳动合同法》第三十八条第一款第二项."""
        law = self.law_title or self.citation.law
        out = f"《{law}》{self.citation.article}"
        if self.citation.kuan:
            out += f"第{int_to_cn(self.citation.kuan)}款"
        if self.citation.xiang:
            out += f"第{int_to_cn(self.citation.xiang)}项"
        return out
