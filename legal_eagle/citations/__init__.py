"""Statute citations a user can trust: parse, check and retrieve PRC law articles.

Importing this package is cheap (no jieba, no disk); ``StatuteBase.open`` does the work.

    base = StatuteBase.open(settings.laws_path, settings.cache_path / "citations")
    if base is None: show MISSING_NOTICE
    sources = base.retrieve(question, k=5)      # → grounding_block(sources) in the system message
    checks = base.check(answer)                 # → render_panel(checks, sources) under the answer
"""

from legal_eagle.citations.panel import grounding_block, neutralise, render_panel
from legal_eagle.citations.parser import Citation, CitationParser, cited_set, parse_citations
from legal_eagle.citations.records import Article, CitationCheck
from legal_eagle.citations.statutes import MISSING_NOTICE, StatuteBase

__all__ = [
    "MISSING_NOTICE",
    "Article",
    "Citation",
    "CitationCheck",
    "CitationParser",
    "StatuteBase",
    "cited_set",
    "grounding_block",
    "neutralise",
    "parse_citations",
    "render_panel",
]
