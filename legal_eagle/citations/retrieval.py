"""BM25 (Okapi) over the articles' postings stored in the SQLite index.

A small hand-written scorer rather than rank-bm25: the postings already live in the index file,
so nothing is rebuilt in memory per process, and only the question's terms are read per query.
"""

from __future__ import annotations

import heapq
import math
import re
import sqlite3
from collections import Counter
from collections.abc import Sequence

from legal_eagle.citations.numerals import parse_number

K1 = 1.2
B = 0.75

_EXPANSIONS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("工资", "薪水", "薪资"), ("劳动报酬",)),
    (("没发工资", "不发工资", "拖欠", "欠薪"), ("未及时", "足额", "支付", "劳动报酬")),
    (("辞职", "离职", "辞退", "开除", "炒鱿鱼", "裁员"), ("解除", "劳动合同")),
    (("补偿金", "补偿"), ("经济补偿",)),
    (("老板", "公司", "单位"), ("用人单位",)),
    (("员工", "职工", "打工"), ("劳动者",)),
    (("老婆", "老公", "丈夫", "妻子"), ("配偶", "夫妻")),
    (("孩子", "小孩", "儿子", "女儿"), ("子女",)),
    (("房东",), ("出租人",)),
    (("租客", "房客"), ("承租人",)),
    (("租房", "租的房", "租住"), ("租赁",)),
    (("欠钱", "借钱", "借给", "欠我"), ("借款",)),
    (("酒驾", "醉驾", "喝醉", "喝酒"), ("醉酒",)),
    (("开车", "酒驾", "醉驾"), ("驾驶", "机动车")),
    (("网购", "网上买"), ("网络", "商品")),
    (("撞",), ("交通事故",)),
    (("偷",), ("盗窃",)),
    (("骗",), ("诈骗", "欺诈")),
    (("假货",), ("欺诈",)),
    (("打伤", "打架", "打成"), ("伤害",)),
    (("判几年", "判刑", "坐牢", "会判", "量刑"), ("有期徒刑", "刑事责任")),
    (("打官司", "起诉", "告他"), ("诉讼",)),
    (("哪个法院", "哪里起诉", "去哪起诉", "在哪起诉", "哪个法院立案"), ("管辖",)),
    (("狗", "猫", "宠物"), ("饲养", "动物")),
    (("楼上", "高空"), ("建筑物",)),
    (("扔", "抛"), ("抛掷",)),
    (("去世", "过世", "死了"), ("死亡", "继承")),
    (("没有遗嘱", "没留遗嘱", "未留遗嘱", "没有留遗嘱"), ("法定继承",)),
    (("有效吗", "有没有效", "还有效", "无效"), ("效力", "无效", "民事法律行为")),
    (("多久", "多长时间", "多少天", "几天", "几年", "时间限制"), ("期间", "期限", "之日起")),
)
"""Everyday phrases in questions → the words the statutes use (added to the query, never replacing it)."""

_AMOUNT = re.compile(
    r"^[0-9零〇一二两三四五六七八九十百千万几多半]+(?:元|块|块钱|万元|千元|岁|周岁|年|个月|月|天|日|次|部|个|人|倍)?$")
_AGE = re.compile(r"([0-9]{1,2}|[一二两三四五六七八九十]{1,3})(?:周)?岁")


def drop_amounts(tokens: Sequence[str]) -> list[str]:
    """Query tokens without bare amounts (五千元, 三个月, 几年): they match fines and terms, not topics."""
    return [t for t in tokens if not _AMOUNT.match(t)]


def expansion_terms(question: str) -> list[str]:
    """Statute words for the everyday phrases and ages (七岁 → 周岁, 未成年人) in ``question``."""
    out: list[str] = []
    for phrases, terms in _EXPANSIONS:
        if any(p in question for p in phrases):
            out.extend(terms)
    for match in _AGE.finditer(question):
        out.append("周岁")
        try:
            if parse_number(match.group(1)) < 18:
                out.append("未成年人")
        except ValueError:
            continue
    return out


class Bm25:
    """Scores articles for a list of query terms against one index connection's postings.

    Args:
        n_docs: number of searchable articles.
        avgdl: their mean length in tokens.
        lengths: article id → length in tokens.
    """

    def __init__(self, n_docs: int, avgdl: float, lengths: dict[int, int]) -> None:
        self.n_docs = n_docs
        self.avgdl = avgdl or 1.0
        self.lengths = lengths

    @classmethod
    def from_index(cls, conn: sqlite3.Connection) -> Bm25:
        """Load the collection statistics (a few hundred KB) from an index."""
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        lengths = dict(conn.execute("SELECT id, length FROM articles WHERE length > 0").fetchall())
        return cls(int(meta["n_docs"]), float(meta["avgdl"]), lengths)

    def idf(self, df: int) -> float:
        """Okapi idf, floored at a small positive value (Lucene's +1 form)."""
        return math.log(1 + (self.n_docs - df + 0.5) / (df + 0.5))

    def search(self, conn: sqlite3.Connection, terms: Sequence[str], k: int) -> list[tuple[int, float]]:
        """The ``k`` best (article id, score) pairs for ``terms``, best first.

        Args:
            conn: a connection to the index the statistics came from.
            terms: query tokens (repeats weigh a term more).
            k: how many results.

        Returns:
            Up to ``k`` pairs with a positive score.
        """
        scores: dict[int, float] = {}
        for term, qtf in Counter(terms).items():
            row = conn.execute("SELECT df FROM terms WHERE term=?", (term,)).fetchone()
            if row is None:
                continue
            weight = self.idf(row[0]) * (1 + math.log(qtf))
            for art_id, tf in conn.execute("SELECT article_id, tf FROM postings WHERE term=?", (term,)):
                norm = tf + K1 * (1 - B + B * self.lengths.get(art_id, self.avgdl) / self.avgdl)
                scores[art_id] = scores.get(art_id, 0.0) + weight * tf * (K1 + 1) / norm
        return heapq.nlargest(k, scores.items(), key=lambda item: item[1])
