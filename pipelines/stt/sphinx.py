"""PocketSphinx offline speech-to-text: VAD-cut utterances decoded off the event loop, biased to keyphrases."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import re
import tempfile
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from media.framing import FrameSplitter
from media.g711 import FRAME_MS, SAMPLE_RATE, ulaw_to_pcm16
from media.resample import resample
from media.vad import SpeechStarted as VadSpeechStarted
from media.vad import SpeechStopped, VoiceActivityDetector
from pipelines.offline_workers import OfflineWork, OfflineWorkError
from pipelines.stt.base import MAX_REPLAY_MS, EndOfTurn, SpeechStarted, STTError, STTEvent, TranscriptUpdate

log = logging.getLogger(__name__)

_T = TypeVar("_T")

MODEL_SAMPLE_RATE = 16000
"""The en-us acoustic model's rate; caller audio is upsampled to it (decoding at 8 kHz measured far worse)."""

PRE_ROLL_MS = 300
"""Audio kept from before the VAD's speech start, so the first phoneme and some silence reach the decoder."""

TAIL_MS = 200
"""Silence kept after the VAD's speech end; more trailing silence measured worse (spurious short words)."""

MAX_UTTERANCE_MS = 20_000
"""A stretch of speech this long is decoded even if the caller has not paused: its words come final, and the turn
goes on until the caller pauses (the decoder takes one utterance at a time, and its memory grows with it)."""

MAX_BACKLOG_MS = MAX_REPLAY_MS
"""Speech a call may have waiting for a decode (a fallback's replay of a turn comes at once); past it the oldest
waiting utterances are dropped."""

KEYPHRASE_WEIGHT = 30
"""How many times each keyphrase (and each of its words) counts in the vocabulary's language-model corpus."""

NBEST_DEPTH = 10
"""Alternative hypotheses searched for a keyphrase when the best one has none ("two please" for "tuesday please")."""

KEYPHRASE_MARGIN = 0.04
"""How much worse (natural log of the lattice path score) a hypothesis with a keyphrase may score and still win."""

# Everyday phone-call words and phrases, so callers who stray from the keyphrases still get sensible text.
BASE_PHRASES = (
    "yes",
    "no",
    "yes please",
    "no thank you",
    "thank you",
    "thanks",
    "goodbye",
    "bye",
    "hello",
    "hi",
    "okay",
    "sure",
    "maybe",
    "i don't know",
    "what",
    "sorry",
    "can you repeat that",
    "i would like to",
    "i want to",
    "can i",
    "could you",
    "please",
    # Lists as one word per line: a line "one two three" would make "two three" a likely pair.
    *["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "today", "tomorrow"],
    *["morning", "afternoon", "evening"],
    *["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"],
    "o'clock",
    "my name is",
    "speak to someone",
    "how much",
    "when",
    "where",
    "help",
)

_WORD = re.compile(r"[a-z][a-z']*")


def normalize_words(text: str) -> list[str]:
    """Lower-case words of `text` as the dictionary spells them (letters and apostrophes)."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """What a decoder search recognizes: pronunciations for its words and an ARPA language model."""

    key: tuple[str, ...]
    pronunciations: tuple[tuple[str, str], ...]
    arpa: str
    unknown_words: tuple[str, ...]


def _dictionary_path() -> Path:
    from pocketsphinx import get_model_path

    return Path(get_model_path("en-us/cmudict-en-us.dict"))


def _build_vocabulary(keyphrases: tuple[str, ...]) -> Vocabulary:
    # Scans the 3 MB dictionary: once per distinct set of keyphrases in each process that decodes.
    from pocketsphinx.lm import ArpaBoLM

    key_lines = [" ".join(normalize_words(phrase)) for phrase in keyphrases]
    key_words = [word for line in key_lines for word in line.split()]
    wanted = {word for phrase in BASE_PHRASES for word in phrase.split()} | set(key_words)
    pronunciations: list[tuple[str, str]] = []
    found: set[str] = set()
    with _dictionary_path().open(encoding="utf-8") as dictionary:
        for line in dictionary:
            entry, _, phones = line.partition(" ")
            word = entry.split("(", 1)[0]
            if word in wanted:
                pronunciations.append((entry, phones.strip()))
                found.add(word)
    unknown = tuple(sorted(wanted - found))
    # Words the dictionary cannot pronounce would make the language model unusable: leave them out.
    corpus = [*BASE_PHRASES, *([*key_lines, *key_words] * KEYPHRASE_WEIGHT)]
    sentences = [" ".join(w for w in line.split() if w in found) for line in corpus]
    model = ArpaBoLM(text="\n".join(s for s in sentences if s), add_start=True)
    model.compute()
    arpa = _StringSink()
    model.write(arpa)
    return Vocabulary(key=keyphrases, pronunciations=tuple(pronunciations), arpa=arpa.text(), unknown_words=unknown)


class _StringSink:
    def __init__(self) -> None:
        self._parts: list[str] = []

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def text(self) -> str:
        return "".join(self._parts)


class SphinxDecoder:
    """One PocketSphinx decoder with the searches it has built (one per process: see `load_process_decoder`)."""

    MAX_SEARCHES = 16

    def __init__(self, vocabulary: Vocabulary) -> None:
        """Load the acoustic model with `vocabulary`'s words."""
        from pocketsphinx import Decoder

        with _temporary_file(
            ".dict", "".join(f"{entry} {phones}\n" for entry, phones in vocabulary.pronunciations)
        ) as path:
            # Utterances are decoded whole: normalise each by its own cepstral mean ("batch"), so a shared
            # decoder carries nothing from one caller's utterance into the next.
            self._decoder: Any = Decoder(lm=None, dict=path, cmn="batch", loglevel="FATAL")
        self._searches: OrderedDict[tuple[str, ...], str] = OrderedDict()
        self._serial = 0

    def prepare(self, vocabulary: Vocabulary) -> None:
        """Build the search for `vocabulary` now, so the first utterance decoded with it does not wait for it."""
        self._search(vocabulary)

    def recognize(self, pcm8k: npt.NDArray[np.int16], vocabulary: Vocabulary) -> str:
        """The words in one utterance of 8 kHz PCM, lower case, empty when none were recognized."""
        self._decoder.activate_search(self._search(vocabulary))
        audio = resample(pcm8k, SAMPLE_RATE, MODEL_SAMPLE_RATE).astype(np.float32)
        # Digital silence (a gateway's idle μ-law) skews the model's per-utterance cepstral mean; a faint floor of
        # noise like a real line's measured several points better on the keyphrases. Seeded: same audio, same words.
        audio += np.random.default_rng(0).normal(0.0, 20.0, len(audio)).astype(np.float32)
        samples = np.clip(audio, -32768, 32767).astype(np.int16)
        self._decoder.start_utt()
        self._decoder.process_raw(samples.tobytes(), False, True)
        self._decoder.end_utt()
        hypothesis = self._decoder.hyp()
        if hypothesis is None:
            return ""
        words = " ".join(normalize_words(hypothesis.hypstr))
        if not words or _has_keyphrase(words, vocabulary.key):
            return words
        return self._keyphrase_alternative(vocabulary.key) or words

    def _keyphrase_alternative(self, keyphrases: tuple[str, ...]) -> str | None:
        # eSpeak's "tuesday please" comes out as "two please" about one time in four, with "tuesday" a close second:
        # the best-scoring of the first NBEST_DEPTH paths through the lattice that has a keyphrase, if it is close.
        # Scores are probabilities (logmath.exp of a log score): compared as logs; underflowed ones are skipped.
        if not keyphrases:
            return None
        best = -math.inf
        found: tuple[float, str] | None = None
        for alternative in itertools.islice(self._decoder.nbest(), NBEST_DEPTH):
            if alternative is None:  # the n-best iterator ends with None when the lattice runs out of paths
                break
            if alternative.score <= 0.0:
                continue
            score = math.log(alternative.score)
            best = max(best, score)
            words = " ".join(normalize_words(alternative.hypstr))
            if (found is None or score > found[0]) and _has_keyphrase(words, keyphrases):
                found = (score, words)
        return found[1] if found is not None and best - found[0] <= KEYPHRASE_MARGIN else None

    def _search(self, vocabulary: Vocabulary) -> str:
        name = self._searches.get(vocabulary.key)
        if name is not None:
            self._searches.move_to_end(vocabulary.key)
            return name
        for entry, phones in vocabulary.pronunciations:
            if self._decoder.lookup_word(entry) is None:
                self._decoder.add_word(entry, phones, False)
        self._serial += 1
        name = f"vocabulary{self._serial}"
        with _temporary_file(".arpa", vocabulary.arpa) as path:
            self._decoder.add_lm_file(name, path)
        self._searches[vocabulary.key] = name
        if len(self._searches) > self.MAX_SEARCHES:
            _, evicted = self._searches.popitem(last=False)
            self._decoder.remove_search(evicted)
        return name


def _has_keyphrase(words: str, keyphrases: tuple[str, ...]) -> bool:
    # Whole words only: "open" is not in "opening", "no" not in "know".
    padded = f" {words} "
    return any(f" {phrase} " in padded for phrase in keyphrases)


@contextmanager
def _temporary_file(suffix: str, content: str) -> Iterator[str]:
    # PocketSphinx reads dictionaries and language models only from files.
    handle, path = tempfile.mkstemp(prefix="dialtone-sphinx-", suffix=suffix)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(content)
        yield path
    finally:
        Path(path).unlink(missing_ok=True)


MAX_VOCABULARIES = 64
"""Vocabularies (distinct sets of keyphrases) a process keeps built."""

_decoder: SphinxDecoder | None = None
_vocabularies: OrderedDict[tuple[str, ...], Vocabulary] = OrderedDict()


def vocabulary_key(keyphrases: Iterable[str]) -> tuple[str, ...]:
    """The keyphrases as a vocabulary is known by: normalized, deduplicated, sorted."""
    return tuple(sorted({" ".join(normalize_words(phrase)) for phrase in keyphrases} - {""}))


def load_process_decoder() -> SphinxDecoder:
    """This process's decoder, loading the en-us model on first use (offline workers load it as they start)."""
    global _decoder  # noqa: PLW0603 - a decoder is a process's loaded model, shared by every utterance it decodes
    if _decoder is None:
        vocabulary = _process_vocabulary(())
        try:
            _decoder = SphinxDecoder(vocabulary)
        except Exception as exc:
            raise STTError(
                f"PocketSphinx: cannot load the en-us model from the pocketsphinx wheel ({exc})", provider="sphinx"
            ) from exc
    return _decoder


def prepare_recognizer(key: tuple[str, ...]) -> None:
    """Build the vocabulary for `key` (a `vocabulary_key`) into this process's decoder; STTError if it cannot."""
    load_process_decoder().prepare(_process_vocabulary(key))


def recognize_utterance(pcm8k: npt.NDArray[np.int16], key: tuple[str, ...]) -> str:
    """The words in one utterance of 8 kHz PCM, favouring the keyphrases of `key` (a job for offline workers)."""
    decoder = load_process_decoder()
    vocabulary = _process_vocabulary(key)
    try:
        return decoder.recognize(pcm8k, vocabulary)
    except Exception as exc:
        raise STTError(f"PocketSphinx: decoding failed ({exc})", provider="sphinx") from exc


def _process_vocabulary(key: tuple[str, ...]) -> Vocabulary:
    vocabulary = _vocabularies.get(key)
    if vocabulary is not None:
        _vocabularies.move_to_end(key)
        return vocabulary
    try:
        vocabulary = _build_vocabulary(key)
    except Exception as exc:
        raise STTError(
            f"PocketSphinx: cannot build the vocabulary for keyphrases {list(key)} ({exc})", provider="sphinx"
        ) from exc
    _vocabularies[key] = vocabulary
    if len(_vocabularies) > MAX_VOCABULARIES:
        _vocabularies.popitem(last=False)
    return vocabulary


@dataclass(frozen=True, slots=True, eq=False)
class Utterance:
    """One VAD-cut stretch of a caller's speech, 8 kHz PCM, ending `at_ms` into the stream."""

    pcm8k: npt.NDArray[np.int16]
    at_ms: int
    ends_turn: bool = True
    """False for the speech so far cut while the caller speaks on (`finalize_now`, `MAX_UTTERANCE_MS`): its words
    are final, the turn goes on."""
    finalized: bool = False
    """The answer to `finalize_now`: its words come as a `TranscriptUpdate` with `finalized`, even when none."""


def _length_ms(utterance: Utterance) -> int:
    return len(utterance.pcm8k) * 1000 // 8000


class UtteranceBacklog:
    """A call's utterances waiting for a decode, oldest first; past `max_ms` of audio the oldest are dropped.

    A call whose decodes fall behind its caller (every worker busy) thus holds a bounded amount of audio, and
    what it decodes when a worker frees up is the newest speech, the speech its next reply should answer.
    """

    def __init__(self, max_ms: int = MAX_BACKLOG_MS) -> None:
        """Create an empty backlog holding at most `max_ms` of audio (the newest utterance always stays)."""
        self.max_ms = max_ms
        self.dropped = 0
        """Utterances dropped so far."""
        self._waiting: deque[Utterance] = deque()
        self._waiting_ms = 0
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def waiting_ms(self) -> int:
        """Audio waiting, in milliseconds."""
        return self._waiting_ms

    def put(self, utterance: Utterance) -> None:
        """Queue an utterance, dropping the oldest waiting ones (with a log line) while over the bound."""
        self._waiting.append(utterance)
        self._waiting_ms += _length_ms(utterance)
        while self._waiting_ms > self.max_ms and len(self._waiting) > 1:
            oldest = self._waiting.popleft()
            self._waiting_ms -= _length_ms(oldest)
            self.dropped += 1
            log.warning(
                "PocketSphinx: decoding is behind the caller (%d ms of speech waiting, over %d ms): "
                "dropped the oldest utterance (%d ms, ended at %d ms)",
                self._waiting_ms + _length_ms(oldest),
                self.max_ms,
                _length_ms(oldest),
                oldest.at_ms,
            )
        self._ready.set()

    async def get(self) -> Utterance | None:
        """The oldest waiting utterance, waiting for one if need be; None once closed and empty."""
        while not self._waiting:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        utterance = self._waiting.popleft()
        self._waiting_ms -= _length_ms(utterance)
        return utterance

    def close(self) -> None:
        """No more utterances: `get` returns None once the waiting ones are taken."""
        self._closed = True
        self._ready.set()


_CLOSED = object()


class SphinxSTT:
    """A call's PocketSphinx recognizer (SpeechToText): VAD per frame on the loop, each utterance decoded by `work`.

    `work` is where decoding runs: the engine's OfflineWorkers, or `INLINE` (on the event loop, stalling it for
    as long as a decode takes) for tests and tools that have no engine.
    """

    def __init__(
        self,
        *,
        work: OfflineWork,
        keyphrases: Iterable[str] = (),
        end_silence_ms: int = 700,
        max_backlog_ms: int = MAX_BACKLOG_MS,
    ) -> None:
        """Create a recognizer favouring `keyphrases`; a turn ends after `end_silence_ms` of silence."""
        self._work = work
        self._key = vocabulary_key(keyphrases)
        self._vad = VoiceActivityDetector(stop_ms=end_silence_ms)
        self._splitter = FrameSplitter()
        self._pre_roll: deque[npt.NDArray[np.int16]] = deque(maxlen=PRE_ROLL_MS // FRAME_MS)
        self._utterance: list[npt.NDArray[np.int16]] = []
        self._utterance_start_ms = 0
        self._backlog = UtteranceBacklog(max_backlog_ms)
        self._events: asyncio.Queue[STTEvent | STTError | object] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._turn_words: list[str] = []  # final words of the turn's stretches cut while the caller spoke on

    @property
    def punctuates(self) -> bool:
        """PocketSphinx gives bare lower-case words."""
        return False

    def finalize_now(self) -> None:
        """Finish the utterance in progress now: its words come final (`finalized`); the turn ends at the VAD's
        silence as always, with them and any said after."""
        if self._closed or not self._vad.speaking or not self._utterance:
            return
        speech_end_ms = self._vad.elapsed_ms
        frames, self._utterance = self._utterance, []
        self._utterance_start_ms = speech_end_ms
        self._backlog.put(Utterance(np.concatenate(frames), speech_end_ms, ends_turn=False, finalized=True))

    async def start(self) -> None:
        """Build (or reuse) the keyphrase vocabulary where decoding runs; STTError if it cannot be built."""
        await self._run(prepare_recognizer, self._key)
        self._worker = asyncio.create_task(self._recognize_utterances())

    def send_audio(self, ulaw: bytes, *, voiced: bool = True) -> None:
        """Run the VAD on the caller's audio and collect utterances; decoding happens elsewhere, per utterance."""
        if self._closed:
            return
        for frame in self._splitter.push(ulaw):
            self._process_frame(ulaw_to_pcm16(frame))

    async def events(self) -> AsyncIterator[STTEvent]:
        """Speech starts, final transcripts and ends of turn, in order, until the recognizer is closed."""
        while True:
            event = await self._events.get()
            if event is _CLOSED:
                self._events.put_nowait(_CLOSED)  # later readers end too
                return
            if isinstance(event, STTError):
                raise event
            assert isinstance(event, SpeechStarted | TranscriptUpdate | EndOfTurn)
            yield event

    async def close(self) -> None:
        """Decode the utterance in progress, if any, then end the events; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._vad.speaking and self._utterance:
            self._end_utterance(self._vad.elapsed_ms)
        self._backlog.close()
        if self._worker is not None:
            await self._worker
        self._events.put_nowait(_CLOSED)

    def _process_frame(self, pcm: npt.NDArray[np.int16]) -> None:
        event = self._vad.process(pcm.tobytes())
        if self._vad.speaking or isinstance(event, SpeechStopped):
            self._utterance.append(pcm)
        else:
            self._pre_roll.append(pcm)
        match event:
            case VadSpeechStarted(at_ms=at_ms):
                self._utterance = [*self._pre_roll, pcm]
                self._utterance_start_ms = self._vad.elapsed_ms - FRAME_MS * len(self._utterance)
                self._pre_roll.clear()
                self._events.put_nowait(SpeechStarted(at_ms=at_ms))
            case SpeechStopped(at_ms=at_ms):
                self._end_utterance(at_ms)
            case None if self._vad.speaking and self._vad.elapsed_ms - self._utterance_start_ms >= MAX_UTTERANCE_MS:
                # The caller talks on without a pause: decode what they said so far, not as the end of their turn
                # (the agent would answer them mid-sentence).
                self._end_utterance(self._vad.elapsed_ms, ends_turn=False)
                self._utterance_start_ms = self._vad.elapsed_ms

    def _end_utterance(self, speech_end_ms: int, *, ends_turn: bool = True) -> None:
        keep_frames = (speech_end_ms + TAIL_MS - self._utterance_start_ms) // FRAME_MS
        frames = self._utterance[: max(keep_frames, 1)]
        self._utterance = []
        self._backlog.put(Utterance(np.concatenate(frames), speech_end_ms, ends_turn=ends_turn))

    async def _recognize_utterances(self) -> None:
        # One decode of this call in flight at a time: the rest wait in its bounded backlog, not in the workers' queue.
        while (utterance := await self._backlog.get()) is not None:
            try:
                text = await self._run(recognize_utterance, utterance.pcm8k, self._key)
            except STTError as exc:
                self._events.put_nowait(exc)
                return
            if not utterance.ends_turn:
                self._turn_words += [text] if text else []
                if utterance.finalized:
                    self._events.put_nowait(
                        TranscriptUpdate(text=text, is_final=True, at_ms=utterance.at_ms, finalized=True)
                    )
                # A stretch cut for its length is not announced: the engine would take its words for the whole turn
                # on its own silence after the caller's, while the rest of their speech is still being decoded.
                continue
            if text:
                self._events.put_nowait(TranscriptUpdate(text=text, is_final=True, at_ms=utterance.at_ms))
            whole = " ".join([*self._turn_words, text]).strip()
            self._turn_words.clear()
            if whole:
                self._events.put_nowait(EndOfTurn(text=whole, at_ms=utterance.at_ms))

    async def _run(self, job: Callable[..., _T], *args: Any) -> _T:
        try:
            return await self._work.run(job, *args)
        except OfflineWorkError as exc:
            raise STTError(f"PocketSphinx: {exc}", provider="sphinx") from exc
