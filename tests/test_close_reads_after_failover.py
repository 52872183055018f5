"""The silence after the caller's speech is read frame by frame where the listening recognizer decides on it: when a
fallback recognizer takes over mid-call, its own rules (or none) replace the first one's from the switch itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, cast

from config.agent import parse_agent_configuration
from engine.call.cascade import CLOSE_MARGIN_MS, PipelineDriver
from engine.call.driver import CallHost
from engine.call.phases import CallPhase
from pipelines.fallback import FallbackSTT
from pipelines.llm.base import LanguageModel
from pipelines.registry import Pipeline
from pipelines.stt.base import SpeechStarted, STTError, STTEvent
from pipelines.tts.base import TextToSpeech
from tests.speech import silent_frames, spoken_frames

CONFIG = parse_agent_configuration(
    {"stt": {"provider": "sphinx"}, "llm": {"provider": "conversation_path"}, "tts": {"provider": "espeak"}}
)
OWN_LAST_MS = max(CONFIG.endpointing.silence_ms, CONFIG.endpointing.incomplete_silence_ms)
HOT_UNTIL_MS = OWN_LAST_MS + CLOSE_MARGIN_MS + 1000
"""Where the first recognizer still wants the silence frame by frame, well past the agent's own rules."""


class _Recognizer:
    """A recognizer that hears the caller start speaking, then stays quiet until it fails or is closed."""

    def __init__(self) -> None:
        self.fail = asyncio.Event()
        self._closed = asyncio.Event()
        self._voiced = asyncio.Event()

    async def start(self) -> None:
        pass

    def send_audio(self, ulaw: bytes, *, voiced: bool = True) -> None:
        if voiced:
            self._voiced.set()

    async def events(self) -> AsyncIterator[STTEvent]:
        await self._voiced.wait()
        yield SpeechStarted(at_ms=0)
        failing, closing = asyncio.ensure_future(self.fail.wait()), asyncio.ensure_future(self._closed.wait())
        await asyncio.wait([failing, closing], return_when=asyncio.FIRST_COMPLETED)
        failing.cancel()
        closing.cancel()
        if self.fail.is_set():
            raise STTError("the recognizer's socket is gone")

    async def close(self) -> None:
        self._closed.set()


class _SilentRecognizer(_Recognizer):
    """A recognizer that hears everything and says nothing until it is closed: its rules can only reach the driver
    at the switch, not with an event of its own."""

    async def events(self) -> AsyncIterator[STTEvent]:
        await self._closed.wait()
        return
        yield


class _HotRecognizer(_Recognizer):
    @property
    def prompt_silence_ms(self) -> tuple[int, int]:
        return (200, HOT_UNTIL_MS)


class _Host:
    """What the driver asks of its call while it listens (no reply is made here)."""

    def __init__(self) -> None:
        self.config = CONFIG
        self.clock = asyncio.get_running_loop().time
        self.phase = CallPhase.LISTENING
        self.tasks: list[asyncio.Task[None]] = []
        self.failed: list[str] = []

    def spawn(self, work: Coroutine[Any, Any, None], role: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self.tasks.append(task)
        return task

    def activity(self) -> None:
        pass

    def fail(self, reason: object, detail: str) -> None:
        self.failed.append(detail)


async def _quiet_for(driver: PipelineDriver, speech: list[bytes], quiet_ms: int, at_ms: int) -> int:
    """The caller says `speech`, then is silent for `quiet_ms`; the time of the next frame."""
    for frame in speech + silent_frames(quiet_ms):
        driver.on_caller_audio(frame, at_ms)
        at_ms += 20
        await asyncio.sleep(0)
    return at_ms


async def test_after_a_failover_the_silence_is_read_closely_only_as_long_as_the_new_recognizer_wants() -> None:
    first, second = _HotRecognizer(), _SilentRecognizer()
    stt = FallbackSTT([("first", lambda: first), ("second", lambda: second)])
    host = _Host()
    pipeline = Pipeline(stt=stt, llm=cast(LanguageModel, object()), tts=cast(TextToSpeech, object()))
    driver = PipelineDriver(cast(CallHost, host), pipeline, first_sentence=None)
    await driver.start()
    speech = await spoken_frames("Hello there")
    beyond_own_rules_ms = OWN_LAST_MS + CLOSE_MARGIN_MS + 400

    at_ms = await _quiet_for(driver, speech, beyond_own_rules_ms, 0)
    assert driver.listening_closely, "the first recognizer still decides on this silence"

    first.fail.set()
    at_ms = await _quiet_for(driver, speech, 100, at_ms)
    assert stt.active_name == "second"
    await _quiet_for(driver, [], beyond_own_rules_ms - 100, at_ms)
    assert not driver.listening_closely, "past the agent's own rules, with a recognizer that wants no silence"
    assert host.failed == []

    await stt.close()
    for task in host.tasks:
        task.cancel()
