"""The error tree. Every error carries a plain-Chinese message for the user.

Pure code raises these; only ``legal_eagle.ui`` turns them into Gradio warnings or
errors, and ``app.py`` into a log line and an exit code.
"""

from __future__ import annotations


class LegalEagleError(Exception):
    """Base class: ``user_message`` is what a person sees (Chinese), ``str()`` is for logs."""

    def __init__(self, user_message: str, detail: str = "") -> None:
        super().__init__(detail or user_message)
        self.user_message = user_message


class InputError(LegalEagleError):
    """The user's question or a sampling value is not acceptable."""


class ModelPreparationError(LegalEagleError):
    """Finding, downloading, converting or quantizing the model failed."""


class OfflineError(ModelPreparationError):
    """The model hub cannot be reached and no local copy exists."""


class QuantizationError(ModelPreparationError):
    """AWQ quantization or its check failed; nothing was published."""


class PlatformError(LegalEagleError):
    """This machine cannot run the engine as installed (e.g. the NVIDIA driver is too old for the CUDA build)."""


class EngineError(LegalEagleError):
    """The inference engine failed while loading or generating."""


class GpuMemoryError(EngineError):
    """The GPU has too little free memory for what was asked."""
