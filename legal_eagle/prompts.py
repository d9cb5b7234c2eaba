"""Loads the texts the app shows and sends: persona, disclaimer and example questions.

They live as files in ``prompts/`` (or a folder given by ``--prompts-dir``, where a host
may override any one of them), never in code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "prompts"
FILES = ("persona.md", "disclaimer.md", "examples.txt")


@dataclass(frozen=True)
class Prompts:
    """The persona (system prompt), the disclaimer and the example questions."""

    persona: str
    disclaimer: str
    examples: tuple[str, ...]


def load_prompts(override_dir: Path | None = None) -> Prompts:
    """Read the prompt files; a file in ``override_dir`` replaces the project's one.

    Args:
        override_dir: a host's folder with any of persona.md, disclaimer.md, examples.txt.

    Returns:
        The loaded texts.

    Raises:
        ValueError: a file is missing in both places or the persona/disclaimer is empty.
    """
    texts = {}
    for name in FILES:
        candidates = ([override_dir / name] if override_dir else []) + [DEFAULT_DIR / name]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ValueError(f"prompt file {name} not found in {[str(c.parent) for c in candidates]}")
        texts[name] = path.read_text(encoding="utf-8").strip()
    for name in ("persona.md", "disclaimer.md"):
        if not texts[name]:
            raise ValueError(f"prompt file {name} is empty")
    examples = tuple(
        line.strip() for line in texts["examples.txt"].splitlines() if line.strip() and not line.startswith("#")
    )
    return Prompts(persona=texts["persona.md"], disclaimer=texts["disclaimer.md"], examples=examples)
