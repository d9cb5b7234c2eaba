"""Components adjusted for this app."""

from __future__ import annotations

from typing import Any

import gradio as gr


class CheckedSlider(gr.Slider):
    """A slider whose value reaches the handler unchecked, so the handler can refuse an
    out-of-range API value with a Chinese message (``conversation.validate_sampling``)
    instead of Gradio's English one. The page itself still only offers the slider's range.
    """

    def get_block_name(self) -> str:
        """Render with the ordinary slider front end."""
        return "slider"

    def preprocess(self, payload: Any) -> Any:
        """Pass the raw value on; validation happens in the handler."""
        return payload
