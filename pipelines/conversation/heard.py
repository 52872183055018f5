"""What the caller heard of an agent utterance that was cut short, from how much of its audio was played.

A barge-in's cut (`engine.call.outbound_audio.heard_of_cut`), or else Twilio's marks, say how many milliseconds of
an utterance were played (`played_ms`). A synthesizer that reports alignment (ElevenLabs) says when each character
starts, so the cut falls between two whole words; without it a sentence's words are taken as evenly spread over its
audio. A sentence still being synthesized has no known end yet: it is taken to last `ms_per_char` per character,
this call's speaking rate so far. A speech-to-speech model's utterance has only a transcript: its words are taken as
evenly spread over the audio received.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MS_PER_CHAR = 65.0
"""About 170 words a minute: the speaking rate assumed until the call's own speech says otherwise."""


@dataclass(slots=True)
class SpokenSpan:
    """Where one sentence falls in its utterance's audio, and when its characters start if the TTS said so."""

    text: str
    start_ms: int
    end_ms: int
    complete: bool = False
    aligned_chars: list[str] = field(default_factory=list)
    aligned_ms: list[int] = field(default_factory=list)  # from the span's start

    def heard_by_alignment(self, played_ms: int) -> str | None:
        """The whole words of the span started before `played_ms` (utterance time), if alignment is known."""
        if not self.aligned_chars:
            return None
        cutoff = played_ms - self.start_ms
        count = sum(1 for ms in self.aligned_ms if ms < cutoff)
        spoken = "".join(self.aligned_chars)
        heard = spoken[:count]
        cut_mid_word = count < len(spoken) and not spoken[count].isspace() and not heard[-1:].isspace()
        if cut_mid_word:
            heard = heard.rsplit(maxsplit=1)[0] if " " in heard.strip() else ""  # drop the word cut in half
        return " ".join(self.text.split()[: len(heard.split())])


def heard_of_spans(spans: list[SpokenSpan], played_ms: int, ms_per_char: float = DEFAULT_MS_PER_CHAR) -> str:
    """The words of an utterance made of `spans` the caller heard when playback stopped at `played_ms`."""
    heard: list[str] = []
    for span in spans:
        end = span.end_ms if span.complete else max(span.end_ms, span.start_ms + len(span.text) * ms_per_char)
        if end <= played_ms:
            heard.append(span.text)
            continue
        if span.start_ms < played_ms:
            aligned = span.heard_by_alignment(played_ms)
            if aligned is not None:
                heard.append(aligned)
                break
            heard.append(share_of_words(span.text, played_ms - span.start_ms, end - span.start_ms))
        break
    return " ".join(part for part in heard if part).strip()


def share_of_words(text: str, played_ms: float, total_ms: float) -> str:
    """The first words of `text` in proportion to the share of its `total_ms` of audio that was played."""
    words = text.split()
    share = min(1.0, max(0.0, played_ms / total_ms)) if total_ms > 0 else 0.0
    return " ".join(words[: int(len(words) * share)])


@dataclass(slots=True)
class SpeakingRate:
    """This call's speaking rate: milliseconds of synthesized audio per character of text, as sentences complete."""

    spoken_ms: int = 0
    spoken_chars: int = 0

    def add(self, text: str, audio_ms: int) -> None:
        """Count a sentence that was synthesized whole."""
        self.spoken_ms += audio_ms
        self.spoken_chars += len(text)

    @property
    def ms_per_char(self) -> float:
        """The rate so far, or the default before any sentence completed."""
        return self.spoken_ms / self.spoken_chars if self.spoken_chars else DEFAULT_MS_PER_CHAR
