"""How often a streaming answer updates the page, so that all answers together stay affordable.

Every streamed update costs the Gradio server a few milliseconds of Python under one GIL
(postprocessing the chatbot, the diff against the last value, JSON, the event stream). One
answer at 20 updates a second is nothing; 16 answers at 20 a second saturate the server and
slow every answer down (measured on the H200: 8 users through the app got 240 tok/s in all
where the engine gave 1,044). The pacer keeps the total near ``budget_per_s`` updates a second:
each answer updates every 50 ms while it is alone, less often when many stream at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class UpdatePacer:
    """Shared by the chat handlers of one app.

    Attributes:
        min_interval_s: the shortest time between two updates of one answer.
        budget_per_s: updates a second for all streaming answers together.
    """

    def __init__(self, min_interval_s: float = 0.05, budget_per_s: float = 60.0) -> None:
        if min_interval_s <= 0 or budget_per_s <= 0:
            raise ValueError("min_interval_s and budget_per_s must be positive")
        self.min_interval_s, self.budget_per_s = min_interval_s, budget_per_s
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        """Answers streaming now."""
        return self._active

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """Count one answer as streaming while the block runs."""
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1

    def interval(self) -> float:
        """Seconds between two updates of one answer, given how many stream now."""
        return max(self.min_interval_s, self._active / self.budget_per_s)
