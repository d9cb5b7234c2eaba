"""One question, two engines (fp16 and 4-bit), figures for each and how far the answers agree.

Two timing modes, labelled on every result:

- ``sequential`` (default): each engine answers alone, one after the other, so each has the
  GPU's memory bandwidth to itself (batch-1 decoding is bandwidth-bound).
- ``concurrent``: both answer at once, pulled round-robin as FastChat's side-by-side does;
  with real engines both decode together and share the bandwidth, so each looks slower. A
  chunk is timed when it is pulled, which can lag by one decode step of the other side.

Nothing here knows Gradio; ``ui/compare_tab.py`` renders what these functions yield.
"""

from __future__ import annotations

import csv
import difflib
import logging
import random
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

from legal_eagle.engines.base import Chunk, Engine, Message, SamplingParams
from legal_eagle.errors import LegalEagleError
from legal_eagle.metrics import StreamTimer
from legal_eagle.planner import Plan

log = logging.getLogger(__name__)

Mode = Literal["sequential", "concurrent"]
MODES: tuple[Mode, ...] = ("sequential", "concurrent")
MODE_LABELS: dict[str, str] = {"sequential": "依次计时（各自独占 GPU）",
                               "concurrent": "同时运行（交替输出，共享 GPU 带宽）"}
QUESTIONS_PATH = Path(__file__).resolve().parent.parent / "prompts" / "compare_questions.txt"
Progress = Callable[[str], None]


class EngineProvider(Protocol):
    """Where the comparison gets its fp16 engine (``planner.PlannedProvider``, ``FakeProvider``)."""

    @property
    def plan(self) -> Plan:
        """The memory plan in force (mode, reason, shares)."""
        ...

    def acquire(self, progress: Progress | None = None) -> AbstractContextManager[Engine]:
        """The engine for one comparison (loaded on demand per the plan); raises ``EngineError``."""
        ...

    def held_bytes(self) -> int | None:
        """GPU memory the provided engine holds (measured at load), None if not loaded or unknown."""
        ...


@dataclass(frozen=True)
class UnavailableProvider:
    """No fp16 engine on this run (no TurboMind, remote backend, fp16-only model): says why, in Chinese."""

    reason: str

    @property
    def plan(self) -> Plan:
        """An "unavailable" plan carrying the reason."""
        return Plan("unavailable", self.reason)

    @contextmanager
    def acquire(self, progress: Progress | None = None) -> Iterator[Engine]:
        """Always refuses with the reason."""
        from legal_eagle.errors import GpuMemoryError

        raise GpuMemoryError(self.reason, "comparison unavailable on this run")
        yield  # pragma: no cover (makes this a generator)

    def held_bytes(self) -> int | None:
        """Nothing is loaded."""
        return None


@dataclass
class FakeProvider:
    """A provider for tests and CPU runs: hands out ``engine``, counting loads like a time-shared one.

    Attributes:
        engine: the engine handed out.
        plan_value: the plan reported.
        memory: what ``held_bytes`` reports while acquired (or always, when resident).
        resident: keep the engine "loaded" between comparisons.
    """

    engine: Engine
    plan_value: Plan = field(default_factory=lambda: Plan("both-resident", "测试用的模拟引擎。"))
    memory: int | None = None
    resident: bool = True
    loads: int = 0
    releases: int = 0
    messages: list[str] = field(default_factory=list)
    _loaded: bool = False

    @property
    def plan(self) -> Plan:
        """The configured plan."""
        return self.plan_value

    @contextmanager
    def acquire(self, progress: Progress | None = None) -> Iterator[Engine]:
        """Yield the engine, 'loading' it first when it is not resident yet."""
        say = progress or self.messages.append
        if not self.plan_value.available:
            from legal_eagle.errors import GpuMemoryError

            raise GpuMemoryError(self.plan_value.reason, "fake plan: unavailable")
        if not self._loaded:
            say("正在加载 fp16 模型（模拟）…")
            self.loads += 1
            self._loaded = True
        try:
            yield self.engine
        finally:
            if not self.resident:
                self._loaded = False
                self.releases += 1

    def held_bytes(self) -> int | None:
        """The configured memory while loaded."""
        return self.memory if self._loaded else None


@dataclass
class SideResult:
    """One engine's answer and its figures (filled in while it streams)."""

    key: str
    label: str
    engine: str = ""
    quantization: str = ""
    text: str = ""
    output_tokens: int = 0
    ttft_s: float | None = None
    decode_tok_s: float | None = None
    decode_tokens: int = 0
    decode_s: float = 0.0
    total_s: float | None = None
    finish_reason: str | None = None
    gpu_memory_bytes: int | None = None
    error: str | None = None
    others_running: int = 0

    def take(self, timer: StreamTimer) -> None:
        """Copy the timer's figures."""
        self.output_tokens = timer.n_tokens
        self.ttft_s, self.decode_tok_s, self.total_s = timer.ttft_s, timer.decode_tok_s, timer.total_s
        if timer.t_first is not None and timer.t_last is not None:
            self.decode_tokens = timer.n_tokens - timer.first_tokens
            self.decode_s = timer.t_last - timer.t_first


@dataclass(frozen=True)
class Agreement:
    """How alike two answers are.

    Attributes:
        char_similarity: difflib ``SequenceMatcher.ratio`` over characters, 0..1.
        common_prefix_chars: characters before the answers first differ (greedy divergence point).
        citations_left, citations_right: the (law, article) pairs each answer cites.
    """

    char_similarity: float
    common_prefix_chars: int
    citations_left: frozenset[tuple[str, str]]
    citations_right: frozenset[tuple[str, str]]

    @property
    def same_citations(self) -> bool:
        """True when both cite exactly the same articles (also when neither cites any)."""
        return self.citations_left == self.citations_right

    @property
    def citation_jaccard(self) -> float | None:
        """Shared articles over all cited articles; None when neither answer cites one."""
        union = self.citations_left | self.citations_right
        return len(self.citations_left & self.citations_right) / len(union) if union else None


def cited(text: str) -> frozenset[tuple[str, str]]:
    """The (law, article) pairs a text cites, by ``legal_eagle.citations.cited_set``."""
    from legal_eagle.citations import cited_set

    return frozenset(cited_set(text))


def agreement(left: str, right: str) -> Agreement:
    """Compare two answers: character similarity, shared prefix and cited articles.

    Args:
        left: one answer.
        right: the other.

    Returns:
        The agreement figures.
    """
    ratio = difflib.SequenceMatcher(None, left, right, autojunk=False).ratio() if left or right else 1.0
    pairs = enumerate(zip(left, right, strict=False))
    prefix = next((i for i, (a, b) in pairs if a != b), min(len(left), len(right)))
    return Agreement(round(ratio, 4), prefix, cited(left), cited(right))


@dataclass(frozen=True)
class Contender:
    """One side of a comparison: an engine, its prompt and how to read its GPU memory."""

    key: str
    label: str
    engine: Engine
    messages: Sequence[Message]
    memory: Callable[[], int | None] | None = None

    def result(self) -> SideResult:
        """An empty result for this side."""
        info = self.engine.info
        return SideResult(self.key, self.label, engine=info.name, quantization=info.quantization)


@dataclass
class Snapshot:
    """The state of a comparison after one step (the UI renders each)."""

    mode: Mode
    params: SamplingParams
    left: SideResult
    right: SideResult
    last_side: str | None = None
    done: bool = False
    agreement: Agreement | None = None


def shared_params(params: SamplingParams, rng: random.Random | None = None) -> SamplingParams:
    """The same settings for both sides: a sampled comparison gets one fixed seed."""
    if params.greedy or params.seed is not None:
        return params
    return replace(params, seed=(rng or random.Random()).randrange(2**31 - 1))


def _step(stream: Iterator[Chunk], side: SideResult, timer: StreamTimer) -> bool:
    """Pull one chunk into ``side``; False when the stream has ended (or failed)."""
    try:
        chunk = next(stream)
    except StopIteration:
        side.finish_reason = side.finish_reason or "abort"
        return False
    except LegalEagleError as exc:
        side.error, side.finish_reason = exc.user_message, "error"
        log.warning("comparison side %s failed: %s", side.key, exc)
        return False
    except Exception as exc:  # an engine bug ends this side, not the comparison
        side.error, side.finish_reason = "模型生成时出现内部错误。", "error"
        log.exception("comparison side %s failed: %s", side.key, type(exc).__name__)
        return False
    side.text += chunk.text
    timer.record(chunk.n_tokens)
    side.take(timer)
    if chunk.finish_reason:
        side.finish_reason = chunk.finish_reason
        return False
    return True


def run_comparison(left: Contender, right: Contender, params: SamplingParams, mode: Mode = "sequential", *,
                   first: str = "left", timer: Callable[[], StreamTimer] = StreamTimer,
                   ) -> Generator[Snapshot, None, None]:
    """Stream both answers and their figures.

    Args:
        left: the first side (the fp16 engine in the app).
        right: the second side (the 4-bit engine).
        params: sampling settings used by both (see ``shared_params``).
        mode: "sequential" (each alone) or "concurrent" (round-robin, both at once).
        first: which side goes first in sequential mode ("left" or "right").
        timer: makes a ``StreamTimer`` (tests inject a clock).

    Returns:
        A generator of snapshots, one per chunk; the last has ``done`` and the agreement.
        Closing it closes the engines' streams (which aborts their generations).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if first not in ("left", "right"):
        raise ValueError(f"first must be 'left' or 'right', got {first!r}")
    sides = {"left": (left, left.result()), "right": (right, right.result())}
    snap = Snapshot(mode, params, sides["left"][1], sides["right"][1])
    order = ["left", "right"] if first == "left" else ["right", "left"]
    if mode == "sequential":
        for name in order:
            contender, result = sides[name]
            with closing(run_alone(contender, params, result, timer=timer)) as steps:
                for _ in steps:
                    snap.last_side = name
                    yield snap
    else:
        with ExitStack() as stack:
            for contender, result in sides.values():
                result.others_running = contender.engine.active_generations()
            clocks = {name: timer() for name in order}
            streams = {name: stack.enter_context(closing(_start(sides[name][0], params, sides[name][1])))
                       for name in order}
            alive = list(order)
            while alive:
                for name in list(alive):
                    if not _step(streams[name], sides[name][1], clocks[name]):
                        alive.remove(name)
                        clocks[name].finish()
                        sides[name][1].total_s = clocks[name].total_s
                    snap.last_side = name
                    yield snap
        for contender, result in sides.values():
            if contender.memory is not None:
                result.gpu_memory_bytes = contender.memory()
    yield finish(snap)


def run_alone(contender: Contender, params: SamplingParams, result: SideResult | None = None, *,
              timer: Callable[[], StreamTimer] = StreamTimer) -> Generator[SideResult, None, None]:
    """One side answering alone (the sequential mode's unit), yielding its result after every chunk.

    The last result has ``total_s`` and, when the contender can tell, the engine's GPU memory,
    read as soon as the side ends (a time-shared or exclusive fp16 engine is freed right after).
    Closing the generator closes the engine's stream.
    """
    result = result or contender.result()
    result.others_running = contender.engine.active_generations()
    clock = timer()
    with closing(_start(contender, params, result)) as stream:
        while _step(stream, result, clock):
            yield result
    clock.finish()
    result.total_s = clock.total_s
    if contender.memory is not None:
        result.gpu_memory_bytes = contender.memory()
    yield result


def finish(snap: Snapshot) -> Snapshot:
    """Mark a comparison done and measure the agreement of its two answers."""
    snap.done = True
    snap.agreement = agreement(snap.left.text, snap.right.text)
    return snap


def _start(contender: Contender, params: SamplingParams, result: SideResult) -> Generator[Chunk, None, None]:
    """The side's stream as a generator; a refusal at start (prompt too long, closed engine) ends the side."""
    try:
        stream = contender.engine.stream(contender.messages, params)
    except LegalEagleError as exc:
        result.error, result.finish_reason = exc.user_message, "error"
        return
    try:
        yield from stream
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class BatchRow:
    """One finished question of a batch run."""

    index: int
    question: str
    mode: Mode
    left: SideResult
    right: SideResult
    agreement: Agreement


def load_questions(path: Path = QUESTIONS_PATH) -> list[str]:
    """The batch questions: one a line, '#' comments and blank lines skipped.

    Raises:
        ValueError: the file is missing or lists no question.
    """
    if not Path(path).is_file():
        raise ValueError(f"question list {path} not found")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    questions = [q.strip() for q in lines if q.strip() and not q.lstrip().startswith("#")]
    if not questions:
        raise ValueError(f"question list {path} is empty")
    return questions


def run_batch(questions: Sequence[str], make_contenders: Callable[[str], tuple[Contender, Contender]],
              params: SamplingParams, mode: Mode = "sequential", *,
              timer: Callable[[], StreamTimer] = StreamTimer) -> Iterator[BatchRow]:
    """Compare every question; sequential runs alternate which side goes first (no order bias).

    Args:
        questions: the questions, each asked fresh (no history).
        make_contenders: builds the two sides for a question (prompt, engine, memory).
        params: sampling settings for all questions (a sampled run keeps one seed).
        mode: timing mode, as in ``run_comparison``.
        timer: makes a ``StreamTimer``.

    Returns:
        A generator of rows, one per finished question.
    """
    for index, question in enumerate(questions, start=1):
        left, right = make_contenders(question)
        last: Snapshot | None = None
        with closing(run_comparison(left, right, params, mode, first="left" if index % 2 else "right",
                                    timer=timer)) as steps:
            for last in steps:  # noqa: B007 (the last snapshot is the result)
                pass
        if last is None or last.agreement is None:
            raise RuntimeError("comparison ended without a result")
        yield BatchRow(index, question, mode, last.left, last.right, last.agreement)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _cites(pairs: frozenset[tuple[str, str]]) -> str:
    return "；".join(f"《{law}》{article}" for law, article in sorted(pairs))


def table_columns(left_key: str = "fp16", right_key: str = "awq") -> list[str]:
    """Column names of the batch table and its CSV."""
    per_side = ["ttft_ms", "decode_tok_s", "output_tokens", "total_s", "finish_reason", "citations"]
    return (["no", "question", "mode"] + [f"{left_key}_{c}" for c in per_side]
            + [f"{right_key}_{c}" for c in per_side]
            + ["char_similarity", "common_prefix_chars", "same_citations", "citation_jaccard"])


def _side_cells(side: SideResult, pairs: frozenset[tuple[str, str]]) -> list[object]:
    return [_ms(side.ttft_s), _r(side.decode_tok_s), side.output_tokens, _r(side.total_s, 2),
            side.finish_reason or "", _cites(pairs)]


def _total_cells(sides: Sequence[SideResult]) -> list[object]:
    """Means of TTFT, token-weighted decode speed, summed tokens and time."""
    ttfts = [s.ttft_s for s in sides if s.ttft_s is not None]
    decode_s = sum(s.decode_s for s in sides)
    speed = sum(s.decode_tokens for s in sides) / decode_s if decode_s > 0 else None
    total = sum(s.total_s or 0.0 for s in sides)
    reasons = sum(1 for s in sides if s.finish_reason in ("stop", "length"))
    return [_ms(sum(ttfts) / len(ttfts)) if ttfts else None, _r(speed), sum(s.output_tokens for s in sides),
            round(total, 2), f"{reasons}/{len(sides)} 完成", ""]


def batch_table(rows: Sequence[BatchRow], left_key: str = "fp16",
                right_key: str = "awq") -> list[list[object]]:
    """Rows of the batch table: one per question, then a total row ("总计").

    The total row holds mean time to first token, decode speed over all decode tokens and
    time (token-weighted), summed tokens and seconds, mean similarity, and the share of
    questions whose answers cite the same articles.
    """
    table: list[list[object]] = []
    for row in rows:
        a = row.agreement
        table.append([row.index, row.question, row.mode, *_side_cells(row.left, a.citations_left),
                      *_side_cells(row.right, a.citations_right), a.char_similarity, a.common_prefix_chars,
                      "是" if a.same_citations else "否", _r(a.citation_jaccard, 3)])
    if rows:
        sims = [r.agreement.char_similarity for r in rows]
        jaccards = [j for r in rows if (j := r.agreement.citation_jaccard) is not None]
        same = sum(1 for r in rows if r.agreement.same_citations)
        prefix = sum(r.agreement.common_prefix_chars for r in rows) / len(rows)
        table.append(["总计", f"{len(rows)} 个问题", rows[0].mode, *_total_cells([r.left for r in rows]),
                      *_total_cells([r.right for r in rows]), round(sum(sims) / len(sims), 4),
                      round(prefix, 1), f"{same}/{len(rows)}",
                      _r(sum(jaccards) / len(jaccards), 3) if jaccards else None])
    return table


def write_csv(rows: Sequence[BatchRow], path: Path, left_key: str = "fp16", right_key: str = "awq") -> Path:
    """Write the batch table as CSV (UTF-8 with BOM, so spreadsheet programs read the Chinese).

    Args:
        rows: the finished rows.
        path: the file to write.
        left_key, right_key: column prefixes of the two sides.

    Returns:
        ``path``.
    """
    with Path(path).open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(table_columns(left_key, right_key))
        for line in batch_table(rows, left_key, right_key):
            writer.writerow(["" if cell is None else cell for cell in line])
    return Path(path)
