"""The providers' errors: one root, `ProviderError`, naming the stage that failed and, when known, the provider.

A session catches `ProviderError` once and reads `exc.stage` for its end reason; the stage seams re-export their own
error (`pipelines.stt.base.STTError`, ...), and vendor modules subclass those.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

__all__ = [
    "LLMError",
    "PipelineUnavailable",
    "ProviderError",
    "ProviderKeyMissing",
    "RealtimeError",
    "STTError",
    "Stage",
    "TTSError",
]

Stage = Literal["stt", "llm", "tts", "realtime", "tools"]
"""Where in a call a provider failed: a pipeline stage, the speech-to-speech model, or the agent's functions."""


class ProviderError(Exception):
    """A provider of a call failed or cannot run; `stage` is where, `provider` which one (e.g. "deepgram").

    A subclass fixes its stage once (`class STTError(ProviderError, stage="stt")`); the root takes it per instance.
    """

    default_stage: ClassVar[Stage | None] = None
    """The stage every instance of this class is about, unless one is given."""

    def __init_subclass__(cls, *, stage: Stage | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if stage is not None:
            cls.default_stage = stage

    def __init__(self, message: str, *, stage: Stage | None = None, provider: str | None = None) -> None:
        """An error saying `message` about `provider` in `stage` (default: the class's stage)."""
        chosen = stage or self.default_stage
        if chosen is None:
            raise TypeError(f"{type(self).__name__} needs the stage it failed in")
        super().__init__(message)
        self.stage: Stage = chosen
        self.provider = provider


class STTError(ProviderError, stage="stt"):
    """The recognizer failed and cannot go on (the session may fall back to another one)."""


class LLMError(ProviderError, stage="llm"):
    """The model failed to produce a reply."""


class TTSError(ProviderError, stage="tts"):
    """The synthesizer failed to speak a text."""


class RealtimeError(ProviderError, stage="realtime"):
    """Base class of the errors of a speech-to-speech (Realtime) session."""


class PipelineUnavailable(ProviderError):
    """No provider listed for a stage can run here; the message says which and why."""


class ProviderKeyMissing(ProviderError):
    """This provider cannot run here (its key is missing); the message says why."""
