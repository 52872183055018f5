"""Providers tried in order: when one fails, the call goes on with the next, losing no turn.

A stage configured as a list (`"stt": [{"provider": "deepgram"}, {"provider": "sphinx"}]`) becomes one of
these wrappers. Each moves on only when its current provider fails before it delivered anything it cannot take
back: a recognizer's failure mid-turn replays the caller's current turn into the next one; a model or
synthesizer that fails before its first output is simply replaced for this reply and the rest of the call.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, cast, runtime_checkable

from media.g711 import BYTES_PER_MS
from pipelines.llm.base import (
    ConversationTurn,
    LanguageModel,
    LLMError,
    LLMEvent,
    MessageRole,
    Rewinds,
    TakesMessages,
)
from pipelines.streams import closing_stream
from pipelines.stt.base import (
    MAX_REPLAY_MS,
    EndOfTurn,
    FinalizesEarly,
    PromptSilence,
    SpeechToText,
    STTError,
    STTEvent,
    TranscriptUpdate,
)
from pipelines.tts.base import Alignment, TextToSpeech, TTSError, VoiceIdentity

log = logging.getLogger(__name__)

OnFailover = Callable[[str, str, str], None]
"""Called as (stage, failed provider, next provider) when a call moves on."""


@runtime_checkable
class Prewarmable(Protocol):
    """A provider that can open its connections before the first use, off the latency path."""

    async def prewarm(self) -> None:
        """Open what the first request will need."""
        ...


@runtime_checkable
class FailsOver(Protocol):
    """A provider chain that can give up its current provider for the rest of the call."""

    def fail_over(self) -> str | None:
        """Move to the next provider after the current one failed mid-use; its name, or None if none is left."""
        ...


def _next_provider(stage: str, chain: list[tuple[str, Any]], index: int, on_failover: OnFailover | None) -> int | None:
    """The index after `index` in `chain`, told to `on_failover`; None at the end of the chain."""
    if index + 1 >= len(chain):
        return None
    if on_failover is not None:
        on_failover(stage, chain[index][0], chain[index + 1][0])
    return index + 1


REPLAY_LEAD_IN_MS = 500
"""Audio kept from before the first frame of a turn the engine's VAD called voiced, which may miss a soft onset."""

TRIM_EVERY_MS = 5_000
"""The replay buffer is trimmed in bulk, once per this much audio at most: no memmove per frame."""


class FallbackSTT:
    """Speech-to-text over several recognizers, in order; the caller's current turn survives a switch."""

    def __init__(
        self,
        providers: Sequence[tuple[str, Callable[[], SpeechToText]]],
        *,
        max_replay_ms: int = MAX_REPLAY_MS,
        on_failover: OnFailover | None = None,
    ) -> None:
        """`providers` are (name, factory) pairs; on a switch the next hears the caller's unconfirmed turn again,
        from its first voiced frame (less `REPLAY_LEAD_IN_MS`), at most its last `max_replay_ms`."""
        self._providers = list(providers)
        self._index = -1
        self._active: SpeechToText | None = None
        # The caller's audio of the turn in progress: it ends where the audio received so far ends, and begins where
        # the last turn taken ended (see `turn_taken`), on the call's timeline, less the silence before the turn's
        # speech and, past `max_replay_ms`, its oldest speech (see `_trim`). It holds at most `TRIM_EVERY_MS` more.
        self._recent = bytearray()
        self._received_bytes = 0
        self._voiced_to = 0  # where the last audio the engine's VAD heard the caller in ends (bytes into the call)
        self._speech_from: int | None = None  # where the turn's first voiced audio begins, if any came yet (bytes)
        self._words_to_ms = 0  # where the final words the active recognizer gave so far end (call's timeline)
        self._max_recent = max_replay_ms * BYTES_PER_MS
        self._trim_at = TRIM_EVERY_MS * BYTES_PER_MS  # the length of `_recent` that calls for a trim
        self._offset_ms = 0  # where the active recognizer's stream began on the call's timeline
        self._on_failover = on_failover
        self._switch_listeners: list[Callable[[], None]] = []

    @property
    def active_name(self) -> str | None:
        """The provider now listening."""
        return self._providers[self._index][0] if self._active is not None else None

    def turn_taken(self) -> None:
        """The engine took the final words given so far as a caller turn (perhaps on its own silence, before the
        recognizer ended the turn): the audio they cover is no longer the current turn, and a recognizer taking over
        is not given it to say again as a new turn."""
        self._forget_before(self._words_to_ms)

    def _forget_before(self, at_ms: int) -> None:
        """Keep for a replay only the audio from `at_ms` on the call's timeline: a new turn starts there."""
        boundary = at_ms * BYTES_PER_MS
        start = self._received_bytes - len(self._recent)
        drop = min(boundary - start, len(self._recent))
        if drop > 0:
            del self._recent[:drop]
        if self._speech_from is not None and self._speech_from < boundary:
            # Where the caller's voice came back after it is not known: the new turn's speech may start at once.
            self._speech_from = boundary if self._voiced_to > boundary else None

    def _trim(self) -> None:
        """Drop the silence before the turn's speech (all but `REPLAY_LEAD_IN_MS`) and, once the turn is longer
        than the replay's bound, its oldest audio."""
        received = self._received_bytes
        speech_from = self._speech_from if self._speech_from is not None else received
        keep_from = max(speech_from - REPLAY_LEAD_IN_MS * BYTES_PER_MS, received - self._max_recent)
        keep_from -= keep_from % BYTES_PER_MS  # whole milliseconds: the next recognizer's timeline starts there
        drop = keep_from - (received - len(self._recent))
        if drop > 0:
            del self._recent[:drop]
        self._trim_at = len(self._recent) + TRIM_EVERY_MS * BYTES_PER_MS

    def when_switched(self, listener: Callable[[], None]) -> None:
        """Call `listener` each time a fallback recognizer takes over mid-call, as soon as it listens: before any
        event of its own (the call's turn-taking follows its silence rules from there)."""
        self._switch_listeners.append(listener)

    async def start(self) -> None:
        """Start the first provider that starts."""
        await self._start_next(replay=False)

    async def _start_next(self, *, replay: bool) -> None:
        errors: list[str] = []
        while self._index + 1 < len(self._providers):
            self._index += 1
            name, factory = self._providers[self._index]
            candidate = factory()
            try:
                await candidate.start()
            except STTError as exc:
                log.warning("stt %s could not start: %s", name, exc)
                errors.append(f"{name}: {exc}")
                continue
            self._active = candidate
            if replay:
                self._trim()
            replay_from = self._received_bytes - (len(self._recent) if replay else 0)
            if replay and self._speech_from is not None and self._speech_from < replay_from:
                log.warning(
                    "stt %s takes over a caller turn of %d s: it hears only its last %d s again (the words before are "
                    "lost)",
                    name,
                    (self._received_bytes - self._speech_from) // (1000 * BYTES_PER_MS),
                    len(self._recent) // (1000 * BYTES_PER_MS),
                )
            self._offset_ms = replay_from // BYTES_PER_MS
            if replay and self._recent:
                # Not called speech when it holds none: a recognizer may rightly say nothing to silence (DeepgramSTT
                # takes unanswered speech as a dead socket).
                candidate.send_audio(bytes(self._recent), voiced=self._voiced_to > replay_from)
            return
        self._active = None
        raise STTError("; ".join(errors) or "no speech-to-text provider left")

    def send_audio(self, ulaw: bytes, *, voiced: bool = True) -> None:
        """Pass audio to the active recognizer and keep it for a replay."""
        self._received_bytes += len(ulaw)
        self._recent += ulaw
        if voiced:
            if self._speech_from is None:
                self._speech_from = self._received_bytes - len(ulaw)
            self._voiced_to = self._received_bytes
        if len(self._recent) > self._trim_at:
            self._trim()
        if self._active is not None:
            self._active.send_audio(ulaw, voiced=voiced)

    @property
    def punctuates(self) -> bool:
        """Whether the active recognizer punctuates its transcripts."""
        return isinstance(self._active, FinalizesEarly) and self._active.punctuates

    @property
    def prompt_silence_ms(self) -> tuple[int, int]:
        """The active recognizer's ((0, 0) for one that wants no silence promptly)."""
        return self._active.prompt_silence_ms if isinstance(self._active, PromptSilence) else (0, 0)

    def finalize_now(self) -> None:
        """Ask the active recognizer for its final words now, if it can be asked."""
        if isinstance(self._active, FinalizesEarly):
            self._active.finalize_now()

    async def events(self) -> AsyncIterator[STTEvent]:
        """The active recognizer's events, on the call's timeline, across switches."""
        while self._active is not None:
            active = self._active
            try:
                async for own in active.events():
                    event = dataclasses.replace(own, at_ms=own.at_ms + self._offset_ms)
                    match event:
                        case EndOfTurn(at_ms=at_ms):
                            # Up to where the turn ended, not all received: the caller may have spoken on since.
                            self._forget_before(at_ms)
                        case TranscriptUpdate(is_final=True, at_ms=at_ms, text=text):
                            self._words_to_ms = max(self._words_to_ms, at_ms)
                            if text.strip() and self._speech_from is None:
                                # Words in what the VAD called silence: what is left of it belongs to the turn.
                                self._speech_from = self._received_bytes - len(self._recent)
                    yield event
                return
            except STTError as exc:
                failed = self._providers[self._index][0]
                log.warning("stt %s failed mid-call: %s; trying the next provider", failed, exc)
                await _quietly(active.close)
                await self._start_next(replay=True)  # raises STTError when none is left
                for listener in self._switch_listeners:
                    listener()
                if self._on_failover is not None:
                    self._on_failover("stt", failed, self._providers[self._index][0])

    async def close(self) -> None:
        """Close the active recognizer."""
        if self._active is not None:
            await _quietly(self._active.close)


class FallbackLLM:
    """A language model over several providers: one that fails before saying anything is replaced."""

    def __init__(
        self, providers: Sequence[tuple[str, LanguageModel]], *, on_failover: OnFailover | None = None
    ) -> None:
        """`providers` are (name, model) pairs in order of preference."""
        self._providers = list(providers)
        self._index = 0
        self._on_failover = on_failover

    @property
    def scripted_opening(self) -> bool:
        """As the current provider says."""
        return self._providers[self._index][1].scripted_opening

    async def respond(self, conversation: Sequence[ConversationTurn]) -> AsyncIterator[LLMEvent]:
        """The current provider's reply; on a failure before its first event, the next provider's."""
        while True:
            name, model = self._providers[self._index]
            produced = False
            try:
                async with closing_stream(model.respond(conversation)) as events:
                    async for event in events:
                        produced = True
                        yield event
                return
            except LLMError as exc:
                if produced:
                    raise  # said in part: the caller decides (fail_over) what comes next
                following = _next_provider("llm", self._providers, self._index, self._on_failover)
                if following is None:
                    raise
                log.warning("llm %s failed: %s; trying the next provider", name, exc)
                self._index = following

    def checkpoint(self) -> object:
        """The current provider and its own checkpoint (for a model that `Rewinds`), for `rewind`."""
        model = self._providers[self._index][1]
        return (self._index, model.checkpoint() if isinstance(model, Rewinds) else None)

    def rewind(self, checkpoint: object) -> None:
        """Rewind the provider that was current at `checkpoint` (a fail-over since then stands)."""
        index, inner = cast(tuple[int, object], checkpoint)
        model = self._providers[index][1]
        if isinstance(model, Rewinds):
            model.rewind(inner)

    def add_message(self, role: MessageRole, content: str, *, after_turns: int) -> bool:
        """Give the message to every provider that takes messages (a later one may take over); whether the current
        one took it."""
        taken = [
            isinstance(model, TakesMessages) and model.add_message(role, content, after_turns=after_turns)
            for _, model in self._providers
        ]
        return taken[self._index]

    def fail_over(self) -> str | None:
        """Give up the current model for the rest of the call (it failed mid-reply); the next one's name."""
        following = _next_provider("llm", self._providers, self._index, self._on_failover)
        if following is None:
            return None
        self._index = following
        return self._providers[following][0]

    async def close(self) -> None:
        """Close every provider."""
        for _, model in self._providers:
            await _quietly(model.close)


class FallbackTTS:
    """A synthesizer over several providers: one that fails before its first audio is replaced."""

    def __init__(self, providers: Sequence[tuple[str, TextToSpeech]], *, on_failover: OnFailover | None = None) -> None:
        """`providers` are (name, synthesizer) pairs in order of preference."""
        self._providers = list(providers)
        self._index = 0
        self._on_failover = on_failover

    @property
    def voice_key(self) -> str | None:
        """The current provider's voice (`VoiceIdentity`), if it names one."""
        current = self._providers[self._index][1]
        return current.voice_key if isinstance(current, VoiceIdentity) else None

    async def prewarm(self) -> None:
        """Let the current provider open its connections."""
        current = self._providers[self._index][1]
        if isinstance(current, Prewarmable):
            await current.prewarm()

    async def synthesize(self, text: str) -> AsyncIterator[bytes | Alignment]:
        """The current provider's audio; on a failure before its first audio, the next provider's."""
        while True:
            name, tts = self._providers[self._index]
            produced = False
            try:
                async with closing_stream(tts.synthesize(text)) as chunks:
                    async for chunk in chunks:
                        produced = produced or isinstance(chunk, bytes)
                        yield chunk
                return
            except TTSError as exc:
                if produced:
                    raise  # audio went out: the caller decides (fail_over) what comes next
                following = _next_provider("tts", self._providers, self._index, self._on_failover)
                if following is None:
                    raise
                log.warning("tts %s failed: %s; trying the next provider", name, exc)
                self._index = following

    def fail_over(self) -> str | None:
        """Give up the current synthesizer for the rest of the call (it failed mid-sentence); the next one's name."""
        following = _next_provider("tts", self._providers, self._index, self._on_failover)
        if following is None:
            return None
        self._index = following
        return self._providers[following][0]

    async def close(self) -> None:
        """Close every provider."""
        for _, tts in self._providers:
            await _quietly(tts.close)


async def _quietly(close: Callable[[], Awaitable[None]]) -> None:
    try:
        await close()
    except Exception:
        log.exception("closing a provider failed")
