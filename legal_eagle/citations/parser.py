"""Find the statute articles a text cites, in the forms people and models write them.

Handled: 《中华人民共和国劳动合同法》第三十八条, 劳动合同法第38条, 《民法典》第五百七十七条,
第三十八条第一款第二项, 第三十八条至第四十条, 第38-40条, 第三十八条、三十九条, 第一百三十三条之一,
民法典合同编第五百七十七条, 该法/本法第N条 and a bare 第N条 after a law was named.
The parser only reads text; whether a law or article exists is decided in ``statutes``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from legal_eagle.citations.aliases import ABBREVIATIONS, PRC_PREFIX, REPEALED, short_name, strip_parts
from legal_eagle.citations.numerals import NUM_PATTERN, article_label, parse_number

RANGE_MAX = 30
"""A range longer than this is cut to its first RANGE_MAX articles (and the end article)."""
CONTEXT_CHARS = 300
"""A bare 第N条 belongs to the last law named at most this many characters before it."""

_N = NUM_PATTERN
_RANGE_SEP = r"(?:至|到|~|～|-|—|–)"
_ARTICLE = re.compile(
    rf"第\s*(?P<num>{_N})\s*(?:{_RANGE_SEP}\s*第?\s*(?P<rend0>{_N})\s*)?条(?:\s*之\s*(?P<sub>{_N}))?"
    rf"(?:\s*第\s*(?P<kuan>{_N})\s*款)?"
    rf"(?:\s*第?\s*[（(]?\s*(?P<xiang>{_N})\s*[）)]?\s*项)?"
    rf"(?:\s*{_RANGE_SEP}\s*第?\s*(?P<rend>{_N})\s*条(?:\s*之\s*(?P<rendsub>{_N}))?)?"
)
_CONTINUATION = re.compile(rf"\s*[、，,和及与或]\s*(?P<num>{_N})\s*条(?:\s*之\s*(?P<sub>{_N}))?")
_BRACKET = re.compile(r"《([^《》\n]{1,80})》")
_CONNECTOR = re.compile(r"(?:的|之|中的|中|里的|所规定的|规定的)?\s*$")
_REFERENCE = re.compile(r"(?:该法|本法|此法|上述法律|前述法律|该条例|本条例|该法律|上述法)$")
_ARTICLE_REF = re.compile(rf"第\s*(?:{_N})\s*[条款项](?:\s*之\s*(?:{_N}))?")
_NOT_ARTICLE = re.compile(
    r"\s*[，,、]?\s*(?:建议|理由|原因|意见|途径|路径|方法|措施|办法|注意|步骤|提醒|要点)")
_CJK_RUN = re.compile(r"[\u4e00-\u9fff]{2,40}$")
_LAWLIKE = re.compile(
    r"(?:法|法典|条例|规定|办法|通则|解释|决定|规则|细则|修正案)(?:[（(][一二三四五六七八九十]+[)）])?$")
_LEAD_INS = ("我国", "现行", "根据", "依据", "依照", "按照", "参照", "适用", "违反", "援引", "引用",
             "参见", "对照", "符合", "依", "据", "按", "即", "和", "及", "与", "或", "是", "在",
             "为", "由", "的", "了", "见")
_NOT_NAMES = {"法", "本法", "该法", "此法", "规定", "上述规定", "相关规定", "有关规定", "法律规定", "办法",
              "解释", "决定", "规则", "宪法规定", "方法", "做法", "说法", "看法", "想法", "违法", "合法",
              "非法", "依法", "守法", "执法", "司法", "立法", "办法规定"}
_GENERIC = re.compile(
    r"^(?:相关|有关|上述|前述|其他|其它|该|本|此|这些|那些|上面|下列|各项|各种|一些)|法律规定$|法律法规$")
_MENTION_STOP = set("律规学院人定官庭治制务理典界")
_MENTION_AFTER = set("据照按依反用及和与或的在是为由见即对于了把将以从")
_SHORT_OK = {"刑法", "宪法"}


@dataclass(frozen=True)
class Citation:
    """One cited article as written in a text.

    ``law`` is the short law name as the text gives it (after abbreviation expansion), or the
    name of the law the text named before, for 该法第N条 and bare 第N条; ``article`` is the
    canonical label (第三十八条之一); ``kuan``/``xiang`` are the paragraph and item, if cited.
    """

    raw: str
    law: str
    num: int
    sub: int = 0
    kuan: int | None = None
    xiang: int | None = None
    start: int = 0
    end: int = 0
    via: str = "explicit"  # explicit | reference (该法) | context (bare 第N条)

    @property
    def article(self) -> str:
        """Canonical article label, e.g. 第三十八条."""
        return article_label(self.num, self.sub)

    @property
    def key(self) -> tuple[str, int, int, int | None, int | None]:
        """Identity used to drop repeated citations of the same place."""
        return (self.law, self.num, self.sub, self.kuan, self.xiang)


@dataclass
class _Mention:
    start: int
    end: int
    law: str


def _find_all(text: str, word: str) -> list[int]:
    """Every start index of ``word`` in ``text``."""
    return [m.start() for m in re.finditer(re.escape(word), text)]


def _num(value: str | None) -> int | None:
    return parse_number(value) if value else None


def _lawlike(name: str) -> bool:
    """Whether ``name`` reads like the name of one law (not 相关法律规定, 上述规定, 违法...)."""
    return bool(_LAWLIKE.search(name)) and name not in _NOT_NAMES and not _GENERIC.search(name)


class CitationParser:
    """A parser that also recognises unbracketed law names from a list of known names.

    Args:
        known_names: law names that may appear without 《》 (short names, full titles,
            abbreviations); the static abbreviation and repealed-law tables are always added.
    """

    def __init__(self, known_names: Iterable[str] = ()) -> None:
        names = {n for n in known_names if n} | set(ABBREVIATIONS) | set(REPEALED)
        self.known = frozenset(names)
        scan = sorted((n for n in names if len(n) >= 3 or n in _SHORT_OK), key=len, reverse=True)
        self._mention_re = re.compile("|".join(re.escape(n) for n in scan)) if scan else None

    def _mentions(self, text: str) -> tuple[list[_Mention], list[tuple[int, int]]]:
        """Law names in the text, and the spans of all 《》 titles."""
        mentions: list[_Mention] = []
        spans: list[tuple[int, int]] = []
        for m in _BRACKET.finditer(text):
            spans.append((m.start(), m.end()))
            name = short_name(m.group(1))
            if name in self.known or _lawlike(name):
                mentions.append(_Mention(m.start(), m.end(), name))
        if self._mention_re is not None:
            for m in self._mention_re.finditer(text):
                if any(s <= m.start() < e for s, e in spans):
                    continue
                if m.end() < len(text) and text[m.end()] in _MENTION_STOP:
                    continue
                before = text[m.start() - 1] if m.start() else ""
                if "\u4e00" <= before <= "\u9fff" and before not in _MENTION_AFTER:
                    continue  # 合同法 inside 劳动合同法: part of a longer name
                mentions.append(_Mention(m.start(), m.end(), short_name(m.group(0))))
        mentions.sort(key=lambda x: x.start)
        return mentions, spans

    def _unbracketed(self, text: str, end: int) -> tuple[str, int] | None:
        """An unknown law name written without 《》 that ends at ``end``, and where it starts."""
        window = text[max(0, end - 40):end]
        window = window[max((m.end() for m in _ARTICLE_REF.finditer(window)), default=0):]
        run = _CJK_RUN.search(window)
        if not run:
            return None
        name = run.group(0)
        prc = name.rfind(PRC_PREFIX)
        cuts = [i + len(w) for w in _LEAD_INS for i in _find_all(name, w)
                if not (prc >= 0 and prc <= i < prc + len(PRC_PREFIX))]
        name = name[max(cuts, default=0):]
        if len(name) < 2 or not _lawlike(name):
            return None
        return short_name(name), end - len(name)

    def _law_before(self, text: str, pos: int, mentions: list[_Mention],
                    end_of_match: int) -> tuple[str, str] | None:
        """The law an article at ``pos`` (ending at ``end_of_match``) belongs to, and how it was found."""
        head = text[max(0, pos - 80):pos]
        offset = pos - len(head)
        head = _CONNECTOR.sub("", head)
        stripped = strip_parts(head)
        end = offset + len(stripped)
        for mention in reversed(mentions):
            if mention.end == end:
                return mention.law, "explicit"
        if _REFERENCE.search(stripped):
            previous = [m for m in mentions if m.end <= pos]
            return (previous[-1].law, "reference") if previous else None
        found = self._unbracketed(text, end)
        if found is not None:
            name, start = found
            mentions.append(_Mention(start, end, name))
            mentions.sort(key=lambda x: x.start)
            return name, "explicit"
        previous = [m for m in mentions if m.end <= pos]
        if not previous or pos - previous[-1].end > CONTEXT_CHARS or _NOT_ARTICLE.match(text, end_of_match):
            return None
        return previous[-1].law, "context"

    def parse(self, text: str) -> list[Citation]:
        """Every article citation in ``text``, in order, ranges expanded, repeats dropped.

        Args:
            text: an answer or any Chinese text.

        Returns:
            Citations; an article whose law cannot be told from the text (a bare 第N条 before
            any law is named) is left out.
        """
        mentions, spans = self._mentions(text)
        out: list[Citation] = []
        seen: set[tuple[str, int, int, int | None, int | None]] = set()
        for m in _ARTICLE.finditer(text):
            if any(s <= m.start() < e for s, e in spans):
                continue  # inside a title such as 《关于修改〈文物保护法〉第三十一条的决定》
            law = self._law_before(text, m.start(), mentions, m.end())
            if law is None:
                continue
            name, via = law
            try:
                items = self._expand(m)
            except ValueError:
                continue
            end = m.end()
            for cont in _continuations(text, end):
                items.append((parse_number(cont.group("num")), _num(cont.group("sub")) or 0, None, None))
                end = cont.end()
            for num, sub, kuan, xiang in items:
                cite = Citation(text[m.start():end], name, num, sub, kuan, xiang, m.start(), end, via)
                if cite.key not in seen:
                    seen.add(cite.key)
                    out.append(cite)
        return out

    @staticmethod
    def _expand(m: re.Match[str]) -> list[tuple[int, int, int | None, int | None]]:
        """The (num, sub, kuan, xiang) tuples one article match stands for."""
        num = parse_number(m.group("num"))
        sub = _num(m.group("sub")) or 0
        end_raw = m.group("rend0") or m.group("rend")
        if end_raw is None:
            return [(num, sub, _num(m.group("kuan")), _num(m.group("xiang")))]
        last = parse_number(end_raw)
        last_sub = _num(m.group("rendsub")) or 0
        if last <= num:
            return [(num, sub, None, None)]
        items: list[tuple[int, int, int | None, int | None]] = [(num, sub, None, None)]
        items += [(n, 0, None, None) for n in range(num + 1, min(last, num + RANGE_MAX))]
        items.append((last, last_sub, None, None))
        return items


def _continuations(text: str, pos: int) -> Iterable[re.Match[str]]:
    """Follow-on articles without 第: 第三十八条、三十九条和四十条."""
    while True:
        cont = _CONTINUATION.match(text, pos)
        if cont is None:
            return
        yield cont
        pos = cont.end()


@lru_cache(maxsize=1)
def default_parser() -> CitationParser:
    """A parser that knows only the static abbreviation and repealed-law tables."""
    return CitationParser()


def parse_citations(text: str, parser: CitationParser | None = None) -> list[Citation]:
    """Citations in ``text`` (see ``CitationParser.parse``); ``parser`` defaults to the static one."""
    return (parser or default_parser()).parse(text)


def cited_set(text: str, parser: CitationParser | None = None) -> set[tuple[str, str]]:
    """The (short law name, article label) pairs a text cites, for comparing two answers.

    Args:
        text: an answer.
        parser: a parser that knows the corpus's law names (``StatuteBase.parser``); the static
            one when omitted (it still finds 《》 names and names ending in 法/条例...).

    Returns:
        e.g. ``{("劳动合同法", "第三十八条"), ("民法典", "第五百七十七条")}``; 款/项 are dropped.
    """
    return {(c.law, c.article) for c in parse_citations(text, parser)}
