"""Retrieval quality on the bundled questions: ``python -m legal_eagle.citations.evaluate [--laws DIR]``."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from legal_eagle.citations.statutes import StatuteBase


@dataclass(frozen=True)
class EvalResult:
    """recall@k (mean share of expected articles found), hit@k (share of questions with one found)."""

    k: int
    questions: int
    recall: float
    hit_rate: float
    misses: list[str]


def load_questions(split: str | None = None) -> list[dict[str, Any]]:
    """The bundled evaluation questions (``eval_questions.json``), optionally one split (dev/holdout)."""
    source = resources.files("legal_eagle.citations").joinpath("eval_questions.json")
    text = source.read_text(encoding="utf-8")
    questions: list[dict[str, Any]] = json.loads(text)["questions"]
    return [q for q in questions if split is None or q.get("split") == split]


def evaluate(base: StatuteBase, k: int = 5, questions: list[dict[str, Any]] | None = None) -> EvalResult:
    """Measure retrieval on the questions.

    Args:
        base: an open statute base.
        k: how many retrieved articles count.
        questions: defaults to the bundled set.

    Returns:
        recall@k, hit@k and the questions with nothing found.
    """
    questions = questions if questions is not None else load_questions()
    recall_sum = 0.0
    hits = 0
    misses = []
    for item in questions:
        expected = {(base.find_law(e["law"]) or e["law"], e["article"]) for e in item["expected"]}
        got = {(a.law_title, a.label) for a in base.retrieve(item["question"], k)}
        found = len(expected & got)
        recall_sum += found / len(expected)
        hits += found > 0
        if not found:
            misses.append(item["question"])
    n = len(questions)
    return EvalResult(k, n, recall_sum / n, hits / n, misses)


def main(argv: list[str] | None = None) -> int:
    """Print recall@k for the bundled questions; returns the exit status."""
    import os

    from legal_eagle.config import Settings

    settings = Settings.load([], os.environ)
    parser = argparse.ArgumentParser(prog="python -m legal_eagle.citations.evaluate")
    parser.add_argument("--laws", type=Path, default=settings.laws_path,
                        help=f"statute corpus folder [default: {settings.laws_path}]")
    parser.add_argument("--index-dir", type=Path, default=settings.cache_path / "citations",
                        help=f"where the SQLite index is kept [default: {settings.cache_path / 'citations'}]")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--no-expansion", action="store_true",
                        help="score without the everyday-word expansions")
    parser.add_argument("-v", "--verbose", action="store_true", help="list the questions with no hit")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    base = StatuteBase.open(args.laws, args.index_dir)
    if base is None:
        print(f"no statute corpus at {args.laws}")
        return 1
    opened = time.perf_counter() - started
    base.expand = not args.no_expansion
    started = time.perf_counter()
    print(f"open (incl. any index build): {opened:.1f} s")
    for split in ("dev", "holdout", None):
        result = evaluate(base, args.k, load_questions(split))
        print(f"{split or 'all':8s} questions: {result.questions:3d}  "
              f"recall@{result.k}: {result.recall:.3f}  hit@{result.k}: {result.hit_rate:.3f}")
        if split is not None and args.verbose:
            for question in result.misses:
                print(f"  miss: {question}")
    per_query = (time.perf_counter() - started) / (2 * len(load_questions()))
    print(f"retrieval: {per_query * 1000:.1f} ms/question")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
