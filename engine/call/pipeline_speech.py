"""The pipeline agent's voice: each sentence synthesized and played to the caller with marks, keys pressed as tones,
and each utterance's turn settled with what the caller heard of it (pipelines.conversation.heard).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.call.driver import CallHost
from engine.call.outbound_audio import heard_of_cut
from media.dtmf import InvalidDigits, dtmf_audio
from media.g711 import BYTES_PER_MS
from media.twilio_stream import MarkFlushed, MarkPlayed
from pipelines.conversation.heard import SpeakingRate, SpokenSpan, heard_of_spans
from pipelines.streams import closing_stream
from pipelines.tts.base import Alignment, TextToSpeech
from pipelines.tts.phrases import PhraseCache

__all__ = ["AgentSpeech", "Utterance"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Utterance:
    """One agent turn being spoken: its sentences and where each falls in the utterance's audio."""

    utterance_id: int
    reply_to: float | None  # clock time the caller stopped speaking, for latency
    spans: list[SpokenSpan] = field(default_factory=list)
    stage_at: dict[str, float | None] = field(default_factory=dict)  # clock time each latency stage was reached
    audio_ms: int = 0
    started_stream_ms: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    settled: bool = False
    gate: asyncio.Event | None = None
    """A speculative reply's: its audio is held (synthesized, not played) until the caller's turn is confirmed."""
    speculative: bool = False
    """Started before the caller's turn was confirmed (and then used)."""


class AgentSpeech:
    """The agent's utterances in one call: spoken through the synthesizer, played, and settled as turns."""

    def __init__(self, host: CallHost, tts: TextToSpeech, *, phrases: PhraseCache | None = None) -> None:
        """Speak in `host`'s call through `tts`; scripted sentences through `phrases`, when given."""
        self._host = host
        self._tts = tts
        self._phrases = phrases
        self._rate = SpeakingRate()
        self._current: Utterance | None = None  # the utterance the caller may be hearing now
        self._utterances: dict[int, Utterance] = {}

    @property
    def current(self) -> Utterance | None:
        """The utterance the caller may be hearing now."""
        return self._current

    def release(self, utterance: Utterance) -> None:
        """`utterance` is no longer what the caller may be hearing (if it was)."""
        if self._current is utterance:
            self._current = None

    def take_current(self) -> Utterance | None:
        """The utterance the caller may be hearing now, which no longer is."""
        utterance, self._current = self._current, None
        return utterance

    def new_utterance(self, reply_to: float | None) -> Utterance:
        """A new agent utterance, answering a caller who stopped speaking at `reply_to` (clock time)."""
        utterance = Utterance(self._host.next_utterance_id(), reply_to)
        self._utterances[utterance.utterance_id] = utterance
        return utterance

    def on_mark(self, event: MarkPlayed | MarkFlushed) -> None:
        """A played mark: the caller hears the utterance; its final one: they heard all of it."""
        utterance = self._utterances.get(event.utterance_id)
        if utterance is None or not isinstance(event, MarkPlayed):
            return
        utterance.stage_at.setdefault("firstMarkEchoed", self._host.clock())
        if event.final:
            utterance.done.set()
            if self._current is utterance:
                self._current = None

    async def speak(self, utterance: Utterance, sentence: str, *, scripted: bool = False) -> None:
        """Synthesize `sentence` and play it as part of `utterance` (TTSError if the synthesizer fails).

        A `scripted` sentence (text the agent was given, not the model's words) is said from the phrase cache when
        its voice has said it before. Cancelled, the synthesis is closed at once (its request ends), not left to the
        garbage collector.
        """
        if not _held(utterance):
            self._current = utterance
        span = SpokenSpan(sentence, utterance.audio_ms, utterance.audio_ms)
        utterance.spans.append(span)
        if scripted and self._phrases is not None:
            synthesis = self._phrases.synthesize(self._tts, sentence, owner=self._host.context.organization_id)
        else:
            synthesis = self._tts.synthesize(sentence)
        async with closing_stream(synthesis) as chunks:
            async for chunk in chunks:
                if isinstance(chunk, Alignment):
                    span.aligned_chars.extend(chunk.chars)
                    span.aligned_ms.extend(chunk.start_ms)
                    continue
                await self._play(utterance, chunk)
                if span.end_ms == span.start_ms:  # the sentence's first audio went out
                    self._host.turns.speaking(sentence)
                span.end_ms = utterance.audio_ms
        span.complete = True
        self._rate.add(sentence, span.end_ms - span.start_ms)

    async def _play(self, utterance: Utterance, chunk: bytes) -> None:
        if _held(utterance):
            assert utterance.gate is not None
            utterance.stage_at.setdefault("ttsFirstByte", self._host.clock())
            await utterance.gate.wait()  # synthesized ahead: played once the caller's turn is confirmed
            self._current = utterance
        if utterance.started_stream_ms is None:
            utterance.started_stream_ms = self._host.timeline.stream_ms()
            utterance.stage_at.setdefault("ttsFirstByte", self._host.clock())
        await self._host.audio.play(utterance.utterance_id, chunk)
        utterance.audio_ms += len(chunk) // BYTES_PER_MS

    async def press_keys(self, utterance: Utterance, digits: str) -> None:
        """Play touch tones in the agent's audio (Twilio's stream has no other way to send them)."""
        try:
            tones = dtmf_audio(digits)
        except InvalidDigits as exc:
            log.warning("call %s: %s", self._host.context.call_sid, exc)
            return
        self._current = utterance
        span = SpokenSpan(f"[DTMF {digits}]", utterance.audio_ms, utterance.audio_ms)
        utterance.spans.append(span)
        await self._play(utterance, tones)
        span.end_ms = utterance.audio_ms
        span.complete = True

    def settle(self, utterance: Utterance, *, interrupted: bool, dropped: Mapping[int, int] | None = None) -> None:
        """Write the agent's turn: all of it, or what was heard before it was cut. `dropped`: what a clear threw away
        of each utterance (`OutboundAudio.cut`), the cut point of the recording too; without one, what the marks say
        was heard."""
        if utterance.settled:
            return
        utterance.settled = True
        if self._current is utterance:
            self._current = None
        playback = self._host.playback.utterance(utterance.utterance_id)
        played_ms = playback.played_ms if dropped is None else heard_of_cut(dropped, playback)
        said = " ".join(span.text for span in utterance.spans)
        text = heard_of_spans(utterance.spans, played_ms, self._rate.ms_per_char) if interrupted else said
        if not text and not interrupted:
            return
        first_audio = self._host.audio.first_audio_at.get(utterance.utterance_id)
        if first_audio is not None:
            utterance.stage_at.setdefault("firstFrameSent", first_audio)
        start_ms = utterance.started_stream_ms or 0
        turns = self._host.turns
        turn = turns.place("agent", start_ms, start_ms + (played_ms if interrupted else utterance.audio_ms))
        turn.interrupted = interrupted
        turns.time(turn, utterance.reply_to, utterance.stage_at, speculative=utterance.speculative)
        turns.settle(turn, text, said=said)


def _held(utterance: Utterance) -> bool:
    """Whether `utterance` is a speculative reply whose turn is not confirmed yet (nothing of it may be played)."""
    return utterance.gate is not None and not utterance.gate.is_set()
