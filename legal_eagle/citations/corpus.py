"""Read the statute corpus: one Markdown file per law (format in the corpus's SOURCE.md)."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from legal_eagle.citations.aliases import PRC_PREFIX
from legal_eagle.citations.numerals import article_label, cn_to_int

logger = logging.getLogger(__name__)

INFO_END = "<!-- INFO END -->"
_CN = "零〇一二两三四五六七八九十百千"
_ARTICLE_LINE = re.compile(rf"^第\s*(?P<num>[{_CN}]+)\s*条(?:之(?P<sub>[{_CN}]+))?[ \t\u3000]*(?P<body>.*)$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_FILE_DATE = re.compile(r"[（(](\d{4}-\d{2}-\d{2})[)）]")
_TEXT_DATE = re.compile(r"(\d{4})年(\d{1,2})月(\d{1,2})日")


@dataclass(frozen=True)
class ArticleText:
    """One article as read from a file: number, 之N sub-number, chapter path and full text."""

    num: int
    sub: int
    chapter: str
    text: str


@dataclass
class LawText:
    """One law file: title, short title, version date and its articles in order."""

    title: str
    short: str
    version_date: str
    rel_path: str
    category: str
    articles: list[ArticleText] = field(default_factory=list)


def law_files(laws_dir: Path) -> list[Path]:
    """The law Markdown files under ``laws_dir`` (SOURCE.md and README files excluded), sorted."""
    skip = {"source.md", "readme.md"}
    return sorted(p for p in laws_dir.rglob("*.md") if p.is_file() and p.name.lower() not in skip)


def fingerprint(laws_dir: Path) -> str:
    """A hash of the corpus's file list, sizes and modification times (a changed corpus rebuilds)."""
    digest = hashlib.sha256()
    for path in law_files(laws_dir):
        stat = path.stat()
        digest.update(f"{path.relative_to(laws_dir).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _version_date(path: Path, header: list[str]) -> str:
    """The date in the file name, else the latest adoption/amendment date in the header (not 施行)."""
    found = _FILE_DATE.search(path.stem)
    if found:
        return found.group(1)
    dates = [f"{int(y):04d}-{int(m):02d}-{int(d):02d}"
             for line in header if "施行" not in line for y, m, d in _TEXT_DATE.findall(line)]
    return max(dates) if dates else ""


def short_title(title: str) -> str:
    """The title without the 中华人民共和国 prefix."""
    return title[len(PRC_PREFIX):] if title.startswith(PRC_PREFIX) and len(title) > len(PRC_PREFIX) else title


def read_law(path: Path, laws_dir: Path) -> LawText:
    """Parse one law file.

    Args:
        path: the Markdown file.
        laws_dir: the corpus root (for the relative path and the category folder).

    Returns:
        The law with its articles; paragraphs after an article line belong to it until the next
        article or heading.

    Raises:
        ValueError: the file has no ``# title`` line.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    title = next((ln[2:].strip() for ln in lines if ln.startswith("# ")), "")
    if not title:
        raise ValueError(f"{path}: no '# title' line")
    try:
        body_start = lines.index(INFO_END) + 1
    except ValueError:
        body_start = 0
    rel = path.relative_to(laws_dir)
    law = LawText(title, short_title(title), _version_date(path, lines[:body_start]), rel.as_posix(),
                  rel.parts[0] if len(rel.parts) > 1 else "")
    headings: dict[int, str] = {}
    current: tuple[int, int, str, list[str]] | None = None
    for line in lines[body_start:]:
        line = line.strip()
        if not line or line == INFO_END:
            continue
        heading = _HEADING.match(line)
        article = _ARTICLE_LINE.match(line)
        if (heading or article) and current is not None:
            law.articles.append(ArticleText(current[0], current[1], current[2], "\n".join(current[3])))
            current = None
        if heading:
            level = len(heading.group(1))
            headings = {lv: text for lv, text in headings.items() if lv < level}
            if level > 1:
                headings[level] = re.sub(r"\s+", " ", heading.group(2).strip())
        elif article:
            num, sub = cn_to_int(article.group("num")), cn_to_int(article.group("sub") or "零")
            chapter = " ".join(headings[lv] for lv in sorted(headings))
            current = (num, sub, chapter, [f"{article_label(num, sub)} {article.group('body').strip()}"])
        elif current is not None:
            current[3].append(line)
    if current is not None:
        law.articles.append(ArticleText(current[0], current[1], current[2], "\n".join(current[3])))
    return law


def read_corpus(laws_dir: Path) -> list[LawText]:
    """Every law under ``laws_dir``; unreadable files are logged and skipped.

    Args:
        laws_dir: the corpus root.

    Returns:
        The laws, in file order.
    """
    laws = []
    for path in law_files(laws_dir):
        try:
            laws.append(read_law(path, laws_dir))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            logger.warning("skipping statute file %s: %s", path, exc)
    return laws
