"""The façade the app uses: open the corpus once, check an answer's citations, retrieve articles."""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from legal_eagle.citations.aliases import REPEALED, short_name
from legal_eagle.citations.corpus import law_files
from legal_eagle.citations.index import build_index, connect_readonly
from legal_eagle.citations.numerals import int_to_cn
from legal_eagle.citations.parser import Citation, CitationParser
from legal_eagle.citations.records import Article, CitationCheck
from legal_eagle.citations.retrieval import Bm25, drop_amounts, expansion_terms
from legal_eagle.citations.tokenize import Tokenizer

logger = logging.getLogger(__name__)

MISSING_NOTICE = ("法条核对功能未开启：没有找到法律条文库。运行 `python -m legal_eagle.citations.fetch` "
                  "下载条文库（约 8 MB）后重启应用，即可在回答下方显示“法条”核对和检索到的依据法条。")
"""Shown in the UI when ``StatuteBase.open`` returns None."""
UNKNOWN_LAW_NOTE = "本条文库未收录该法律（可能名称有误、并非法律，或为行政法规、司法解释）"


@dataclass(frozen=True)
class _Law:
    id: int
    title: str
    short: str
    version_date: str
    n_articles: int
    max_num: int


class StatuteBase:
    """A read-only statute base over one index file; share one instance between all users.

    Each thread gets its own SQLite connection, so concurrent readers are safe.
    Use ``StatuteBase.open`` rather than the constructor.
    """

    def __init__(self, index_file: Path, expand: bool = True, tokenizer: Tokenizer | None = None) -> None:
        self.index_file = index_file
        self.expand = expand
        self._local = threading.local()
        conn = self._conn()
        rows = conn.execute("SELECT id, title, short, version_date, n_articles, max_num, is_latest FROM laws")
        self._laws: dict[int, _Law] = {}
        latest: dict[str, int] = {}
        for law_id, title, short, date, n, max_num, is_latest in rows:
            self._laws[law_id] = _Law(law_id, title, short, date, n, max_num)
            if is_latest:
                latest[short] = law_id
        latest_ids = set(latest.values())
        self._by_alias: dict[str, int] = {}
        for alias, law_id in conn.execute("SELECT alias, law_id FROM aliases"):
            key = short_name(alias)
            current = self._by_alias.get(key)
            if current is None or (law_id in latest_ids and current not in latest_ids):
                self._by_alias[key] = law_id
        self.tokenizer = tokenizer or Tokenizer()
        self.tokenizer.add_words(latest)
        self.parser = CitationParser(set(self._by_alias) | {law.title for law in self._laws.values()})
        self._bm25 = Bm25.from_index(conn)

    @classmethod
    def open(cls, laws_dir: Path, index_dir: Path) -> StatuteBase | None:
        """Open the statute base, building its index on first use (20-30 s on 2 cores, then ~0.05 s).

        Args:
            laws_dir: the statute corpus folder (Markdown, see docs/citations.md).
            index_dir: where the SQLite index is kept (e.g. ``<cache_dir>/citations``).

        Returns:
            The base, or None when ``laws_dir`` holds no law files (show ``MISSING_NOTICE``).

        Raises:
            OSError: the index folder cannot be written.
        """
        if not laws_dir.is_dir() or not law_files(laws_dir):
            logger.info("no statute corpus at %s: citation features off", laws_dir)
            return None
        tokenizer = Tokenizer()
        path = build_index(laws_dir, index_dir, tokenizer)
        return cls(path, tokenizer=tokenizer)

    def _conn(self) -> sqlite3.Connection:
        """This thread's read-only connection."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect_readonly(self.index_file)
            self._local.conn = conn
        return conn

    @property
    def law_count(self) -> int:
        """Number of law files in the base (all versions)."""
        return len(self._laws)

    def find_law(self, name: str) -> str | None:
        """The full title of the law ``name`` refers to (newest version), or None."""
        law_id = self._by_alias.get(short_name(name))
        return self._laws[law_id].title if law_id is not None else None

    def _article(self, law: _Law, num: int, sub: int) -> Article | None:
        row = self._conn().execute("SELECT chapter, text FROM articles WHERE law_id=? AND num=? AND sub=?",
                                   (law.id, num, sub)).fetchone()
        return Article(law.title, law.short, law.version_date, num, sub, row[0], row[1]) if row else None

    def article(self, law_name: str, num: int, sub: int = 0) -> Article | None:
        """One article of the newest version of a law, by any of its names, or None.

        Args:
            law_name: e.g. ``"劳动合同法"``, ``"《中华人民共和国民法典》"``, ``"民诉法"``.
            num: the article number.
            sub: the 之N number (0 for none).

        Returns:
            The article, or None if the law or article is not in the base.
        """
        law_id = self._by_alias.get(short_name(law_name))
        return self._article(self._laws[law_id], num, sub) if law_id is not None else None

    def check_citation(self, cite: Citation) -> CitationCheck:
        """The verdict on one parsed citation (see ``CitationCheck``)."""
        law_id = self._by_alias.get(cite.law)
        if law_id is None:
            note = REPEALED.get(cite.law, UNKNOWN_LAW_NOTE)
            return CitationCheck(cite, "unknown_law", note=note)
        law = self._laws[law_id]
        found = self._article(law, cite.num, cite.sub)
        if found is None:
            if cite.num > law.max_num:
                note = f"该法共{int_to_cn(law.max_num)}条，没有{cite.article}"
            else:
                note = f"条文库中该法没有{cite.article}"
            return CitationCheck(cite, "no_article", law.title, law.version_date, note=note)
        excerpt = found.part(cite.kuan, cite.xiang)
        if excerpt is None:
            return CitationCheck(cite, "no_part", law.title, law.version_date, found,
                                 note=f"{found.label}没有所引的款或项")
        return CitationCheck(cite, "found", law.title, law.version_date, found, excerpt=excerpt)

    def check(self, answer_text: str) -> list[CitationCheck]:
        """Check every article an answer cites.

        Args:
            answer_text: the model's (or anyone's) answer.

        Returns:
            One check per distinct cited article/款/项, in order of first citation.
        """
        return [self.check_citation(c) for c in self.parser.parse(answer_text)]

    def cited_set(self, text: str) -> set[tuple[str, str]]:
        """(short law name, article label) pairs cited in ``text``, aliases resolved to this base's names.

        Args:
            text: an answer.

        Returns:
            e.g. ``{("劳动合同法", "第三十八条")}``; a law not in the base keeps its written short name.
        """
        out = set()
        for cite in self.parser.parse(text):
            law_id = self._by_alias.get(cite.law)
            out.add((self._laws[law_id].short if law_id is not None else cite.law, cite.article))
        return out

    def retrieve_scored(self, question: str, k: int = 5,
                        min_score: float = 0.0) -> list[tuple[Article, float]]:
        """The ``k`` articles most relevant to ``question``, with their scores.

        Articles the question itself cites (劳动合同法第三十八条是什么意思?) come first, scored
        ``math.inf``; BM25 over all articles fills the rest.

        Args:
            question: the user's question.
            k: how many articles (1-50).
            min_score: BM25 hits scoring below this are dropped (0 keeps all; unrelated
                questions such as 今天天气怎么样 score about 10, legal ones 20-60).

        Returns:
            (article, score) pairs, best first; empty when no word of the question is indexed.

        Raises:
            ValueError: ``k`` is outside 1-50 or ``min_score`` is negative.
        """
        if not 1 <= k <= 50:
            raise ValueError(f"k must be between 1 and 50, got {k}")
        if min_score < 0:
            raise ValueError(f"min_score must be >= 0, got {min_score}")
        out: list[tuple[Article, float]] = []
        for check in self.check(question):
            if check.article is not None and all(a != check.article for a, _ in out):
                out.append((check.article, math.inf))
        terms = self.tokenizer.tokens(question)
        if self.expand:
            terms = drop_amounts(terms) + expansion_terms(question)
        conn = self._conn()
        for art_id, score in self._bm25.search(conn, terms, k):
            if len(out) >= k or score < min_score:
                break
            law_id, num, sub, chapter, text = conn.execute(
                "SELECT law_id, num, sub, chapter, text FROM articles WHERE id=?", (art_id,)).fetchone()
            law = self._laws[law_id]
            article = Article(law.title, law.short, law.version_date, num, sub, chapter, text)
            if all(a != article for a, _ in out):
                out.append((article, score))
        return out[:k]

    def retrieve(self, question: str, k: int = 5, min_score: float = 0.0) -> list[Article]:
        """The ``k`` articles most relevant to ``question`` (see ``retrieve_scored``)."""
        return [article for article, _ in self.retrieve_scored(question, k, min_score)]
