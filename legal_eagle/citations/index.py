"""The article index: one SQLite file per corpus state, built once and then only read.

The file name carries a hash of the corpus's file list, sizes and mtimes (plus the schema and
tokenizer versions), so a changed corpus gets a new index; it is written to a temporary file and
renamed into place, so readers never see half an index.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from legal_eagle.citations.aliases import ABBREVIATIONS
from legal_eagle.citations.corpus import LawText, fingerprint, read_corpus
from legal_eagle.citations.tokenize import TOKENIZER_VERSION, Tokenizer

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
_BUILD_LOCK = threading.Lock()

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE laws (id INTEGER PRIMARY KEY, title TEXT NOT NULL, short TEXT NOT NULL,
                   version_date TEXT NOT NULL, rel_path TEXT NOT NULL, category TEXT NOT NULL,
                   n_articles INTEGER NOT NULL,
                   max_num INTEGER NOT NULL, is_latest INTEGER NOT NULL);
CREATE TABLE articles (id INTEGER PRIMARY KEY, law_id INTEGER NOT NULL, num INTEGER NOT NULL,
                       sub INTEGER NOT NULL, chapter TEXT NOT NULL, text TEXT NOT NULL,
                       length INTEGER NOT NULL, UNIQUE (law_id, num, sub));
CREATE TABLE aliases (alias TEXT NOT NULL, law_id INTEGER NOT NULL,
                      PRIMARY KEY (alias, law_id)) WITHOUT ROWID;
CREATE TABLE terms (term TEXT PRIMARY KEY, df INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE postings (term TEXT NOT NULL, article_id INTEGER NOT NULL, tf INTEGER NOT NULL,
                       PRIMARY KEY (term, article_id)) WITHOUT ROWID;
"""


def index_path(laws_dir: Path, index_dir: Path) -> Path:
    """Where the index for the corpus's current state lives (the file may not exist yet)."""
    key = hashlib.sha256(f"{fingerprint(laws_dir)}|{SCHEMA_VERSION}|{TOKENIZER_VERSION}".encode()).hexdigest()
    return index_dir / f"statutes-{key[:16]}.sqlite"


@contextlib.contextmanager
def _process_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock between processes (POSIX flock; a no-op where unavailable)."""
    with _BUILD_LOCK, open(lock_file, "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


def _latest_ids(laws: list[LawText]) -> set[int]:
    """Indexes of the newest version of each law (by short title)."""
    best: dict[str, int] = {}
    for i, law in enumerate(laws):
        j = best.get(law.short)
        if j is None or law.version_date > laws[j].version_date:
            best[law.short] = i
    return set(best.values())


def _write(conn: sqlite3.Connection, laws: list[LawText], tokenizer: Tokenizer) -> tuple[int, int]:
    """Fill an empty database; returns (articles stored, articles indexed for retrieval)."""
    conn.executescript(_SCHEMA)
    latest = _latest_ids(laws)
    tokenizer.add_words(law.short for law in laws)
    reverse_abbr: dict[str, list[str]] = {}
    for abbr, full in ABBREVIATIONS.items():
        reverse_abbr.setdefault(full, []).append(abbr)
    df: Counter[str] = Counter()
    total_len = n_docs = n_articles = 0
    for law_id, law in enumerate(laws, start=1):
        nums = [a.num for a in law.articles]
        conn.execute("INSERT INTO laws VALUES (?,?,?,?,?,?,?,?,?)",
                     (law_id, law.title, law.short, law.version_date, law.rel_path, law.category,
                      len(law.articles), max(nums, default=0), int(law_id - 1 in latest)))
        for alias in {law.title, law.short, *reverse_abbr.get(law.short, [])}:
            conn.execute("INSERT OR IGNORE INTO aliases VALUES (?,?)", (alias, law_id))
        for art in law.articles:
            tokens = tokenizer.tokens(f"{art.chapter}\n{art.text}") if law_id - 1 in latest else []
            cur = conn.execute("INSERT OR IGNORE INTO articles (law_id, num, sub, chapter, text, length) "
                               "VALUES (?,?,?,?,?,?)", (law_id, art.num, art.sub, art.chapter, art.text, 0))
            if cur.rowcount == 0:
                logger.warning("duplicate article %s 第%s条 in %s: kept the first",
                               law.short, art.num, law.rel_path)
                continue
            n_articles += 1
            if not tokens:
                continue
            tokens.append(law.short.lower())
            counts = Counter(tokens)
            art_id = cur.lastrowid
            conn.execute("UPDATE articles SET length=? WHERE id=?", (len(tokens), art_id))
            conn.executemany("INSERT INTO postings VALUES (?,?,?)",
                             ((t, art_id, c) for t, c in counts.items()))
            df.update(counts.keys())
            total_len += len(tokens)
            n_docs += 1
    conn.executemany("INSERT INTO terms VALUES (?,?)", df.items())
    meta = {"schema": SCHEMA_VERSION, "tokenizer": TOKENIZER_VERSION, "n_docs": str(n_docs),
            "avgdl": str(total_len / max(n_docs, 1)),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    conn.executemany("INSERT INTO meta VALUES (?,?)", meta.items())
    return n_articles, n_docs


def build_index(laws_dir: Path, index_dir: Path, tokenizer: Tokenizer) -> Path:
    """Return the index for the corpus's current state, building it first if needed.

    Args:
        laws_dir: the statute corpus folder.
        index_dir: where index files live (created if missing).
        tokenizer: the tokenizer retrieval will use for questions.

    Returns:
        The path of a complete, read-only-ready SQLite file.

    Raises:
        OSError: the index folder cannot be written.
    """
    index_dir.mkdir(parents=True, exist_ok=True)
    path = index_path(laws_dir, index_dir)
    if path.exists():
        return path
    with _process_lock(index_dir / ".build.lock"):
        if path.exists():  # another process or thread built it meanwhile
            return path
        started = time.perf_counter()
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.unlink(missing_ok=True)
        conn = sqlite3.connect(tmp)
        try:
            conn.execute("PRAGMA journal_mode=OFF")
            conn.execute("PRAGMA synchronous=OFF")
            with conn:
                n_articles, n_docs = _write(conn, read_corpus(laws_dir), tokenizer)
            conn.execute("VACUUM")
        finally:
            conn.close()
        os.replace(tmp, path)
        for stale in index_dir.glob("statutes-*.sqlite"):
            if stale != path:
                stale.unlink(missing_ok=True)
        logger.info("built statute index %s: %d articles (%d searchable) in %.1f s",
                    path.name, n_articles, n_docs, time.perf_counter() - started)
    return path


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to a built index (one per thread)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=True)
    conn.execute("PRAGMA query_only=ON")
    return conn
