"""eSpeak NG offline text-to-speech: one engine per process, run off the event loop, μ-law 8 kHz out, cached; and
the catalog of the voices its wheel ships, the only ones it is given."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from media.g711 import pcm16_to_ulaw
from media.resample import resample
from pipelines.offline_workers import OfflineWork, OfflineWorkError
from pipelines.tts.base import TTSError

NATIVE_SAMPLE_RATE = 22050
"""eSpeak NG's own output rate, in Hz."""

CHUNK_BYTES = 800
"""μ-law bytes per chunk `EspeakTTS.synthesize` yields: 100 ms at 8 kHz."""

SYNTHESIS_SEED = 1
"""Seed for eSpeak NG's noise generators (its own, and libc's rand() for speechPlayer voices) before each synthesis."""

# Wavegen state that eSpeak NG carries from one synthesis into the next (function-local statics, not in its API): the
# pitch-flutter index, glottal-cycle count, harmonic-spectrum switch and wave phase, with their values at load time.
# Left alone they make each synthesis of a text differ from the last; reset, the same text is the same audio.
_WAVEGEN_STATE = {"Flutter_ix": 0, "cycle_count": 0, "hswitch": 0, "wavephase": 0x7FFFFFFF}
_N_FLUTTER_STEPS = 0x170 * 64  # Flutter_ix wraps here (wavegen.c: N_FLUTTER * 64)

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit() inside the library
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_EE_OK = 0
_EE_NOT_FOUND = 2
_ERRORS = {-1: "internal error", 1: "buffer full", 2: "not found"}


VOICE_HELP = (
    "use a language it speaks ('en-us', 'en-gb', 'fr') or a voice's name ('English (America)'), optionally with a "
    "variant ('en-us+f3')"
)
"""What an agent may name as its eSpeak NG voice, for errors that refuse one."""

_LANGUAGE_LINE = re.compile(rb"^language\s+(\S+)", re.MULTILINE)
_NAME_LINE = re.compile(rb"^name\s+(.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class EspeakCatalog:
    """The voices the espeakng-loader wheel's data ships: what an agent's `voice` may select."""

    languages: frozenset[str]
    """Languages the voices declare, lower case ("en-us", "fr-fr")."""
    voices: frozenset[str]
    """Voices by file, with and without its folder ("en-us", "gmw/en-us"), and by name ("english (america)")."""
    variants: frozenset[str]
    """Variant files, spelled as the library opens them ("f3", "Alex")."""

    def ships(self, voice: str) -> bool:
        """Whether `voice` selects a shipped voice: a language, a voice's file or name (any case), then after `+`
        a variant's file.

        The library takes more, to worse effect: a name it does not know picks a voice by loose likeness or
        fails, an unknown variant is dropped unsaid, and a variant's name alone ("Alex") loads a voice without
        phonemes whose synthesis says nothing, then crashes the process.
        """
        base, plus, variant = voice.partition("+")
        known = base.lower() in self.languages or base.lower() in self.voices
        return known and (not plus or variant in self.variants)


@functools.cache
def espeak_catalog() -> EspeakCatalog:
    """The catalog of the wheel's voices, read once from its voice files."""
    import espeakng_loader

    data = espeakng_loader.get_data_path()
    languages: set[str] = set()
    voices: set[str] = set()
    root = os.path.join(data, "lang")
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            voices.update((name.lower(), os.path.relpath(path, root).replace(os.sep, "/").lower()))
            with open(path, "rb") as voice_file:
                text = voice_file.read()
            languages.update(tag.decode().lower() for tag in _LANGUAGE_LINE.findall(text))
            voices.update(line.decode(errors="replace").lower() for line in _NAME_LINE.findall(text))
    variants = os.path.join(data, "voices", "!v")
    return EspeakCatalog(
        frozenset(languages),
        frozenset(voices),
        frozenset(os.listdir(variants)) if os.path.isdir(variants) else frozenset(),
    )


class _VoiceSpec(ctypes.Structure):
    # espeak_VOICE: a voice selected by its properties, here only by language ("en-gb").
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True, slots=True, eq=False)
class PcmAudio:
    """Mono 16-bit PCM samples at `sample_rate` Hz."""

    samples: npt.NDArray[np.int16]
    sample_rate: int

    @property
    def duration_ms(self) -> float:
        """Length of the audio in milliseconds."""
        return 1000.0 * len(self.samples) / self.sample_rate


class EspeakEngine:
    """A process's eSpeak NG library (its state is process-wide): one synthesis at a time, whatever the thread."""

    def __init__(self) -> None:
        """Create the engine; the library is loaded at the first synthesis."""
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._callback: Any = None  # the ctypes callback must outlive every espeak_Synth call
        self._chunks: list[npt.NDArray[np.int16]] = []
        self._settings: tuple[str, int, int] | None = None
        self._srand: Callable[[int], None] | None = None
        self._wavegen_state: dict[str, ctypes.c_int] = {}

    def load(self) -> None:
        """Load and initialise the library now rather than at the first synthesis; TTSError if it cannot."""
        with self._lock:
            self._library()

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, variant: int) -> npt.NDArray[np.int16]:
        """Speak `text` as PCM at NATIVE_SAMPLE_RATE; raise TTSError on failure. Blocks: keep it off the event loop."""
        with self._lock:
            return self._synthesize(text, voice, rate, pitch, variant)

    def _synthesize(self, text: str, voice: str, rate: int, pitch: int, variant: int) -> npt.NDArray[np.int16]:
        lib = self._library()
        self._configure(lib, voice, rate, pitch)
        if not text.strip():
            return np.zeros(0, dtype=np.int16)
        encoded = text.encode("utf-8") + b"\0"
        self._chunks = []
        self._reset_generators(lib, variant)
        _check(
            lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None),
            f"speaking {text[:40]!r}",
        )
        _check(lib.espeak_Synchronize(), "finishing synthesis")
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    def _library(self) -> ctypes.CDLL:
        if self._lib is not None:
            return self._lib
        import espeakng_loader

        try:
            lib = ctypes.CDLL(espeakng_loader.get_library_path())
        except OSError as exc:
            raise TTSError(
                f"eSpeak NG: cannot load the library from the espeakng-loader wheel ({exc})", provider="espeak"
            ) from None
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_VoiceSpec)]
        lib.espeak_SetVoiceByProperties.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
        srand = _libc_srand()
        data_path = espeakng_loader.get_data_path().encode()
        sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, _INITIALIZE_DONT_EXIT)
        if sample_rate != NATIVE_SAMPLE_RATE:
            raise TTSError(
                f"eSpeak NG: initialisation with data {data_path.decode()!r} failed (returned {sample_rate}); "
                "reinstall the espeakng-loader wheel",
                provider="espeak",
            )
        self._callback = _SynthCallback(self._receive)
        lib.espeak_SetSynthCallback(self._callback)
        self._srand = srand
        self._wavegen_state = _wavegen_state(lib, espeakng_loader.get_library_path())
        self._lib = lib
        return lib

    def _reset_generators(self, lib: ctypes.CDLL, variant: int) -> None:
        # Called under the lock, so no other synthesis touches these between here and espeak_Synth.
        seed = (SYNTHESIS_SEED + variant) & 0x7FFFFFFF
        lib.espeak_ng_SetRandSeed(seed)  # eSpeak's own generator: breath and Klatt noise (seeded from the clock)
        assert self._srand is not None
        self._srand(seed)  # libc's rand(): the speechPlayer voices' frication noise
        for name, start in _WAVEGEN_STATE.items():
            if name in self._wavegen_state:
                self._wavegen_state[name].value = start
        if variant and "Flutter_ix" in self._wavegen_state:
            self._wavegen_state["Flutter_ix"].value = variant * 4099 % _N_FLUTTER_STEPS

    def _receive(self, wav: Any, count: int, _events: int | None) -> int:
        # Called by espeak_Synth, under the lock, with each buffer; a null `wav` marks the end.
        if wav and count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).astype(np.int16))
        return 0

    def _configure(self, lib: ctypes.CDLL, voice: str, rate: int, pitch: int) -> None:
        if self._settings == (voice, rate, pitch):
            return
        self._settings = None
        if not espeak_catalog().ships(voice):  # never handed to the library, which may crash on it
            raise TTSError(f"eSpeak NG: unknown voice {voice!r}; {VOICE_HELP}", provider="espeak")
        # A voice file name ("en-us") first, then a language ("en-gb" lives in the file "en").
        result = lib.espeak_SetVoiceByName(voice.encode("utf-8"))
        if result == _EE_NOT_FOUND:
            spec = _VoiceSpec(languages=voice.encode("utf-8"))
            result = lib.espeak_SetVoiceByProperties(ctypes.byref(spec))
        if result == _EE_NOT_FOUND:
            raise TTSError(f"eSpeak NG: unknown voice {voice!r}; {VOICE_HELP}", provider="espeak")
        _check(result, f"selecting voice {voice!r}")
        _check(lib.espeak_SetParameter(_PARAM_RATE, rate, 0), f"setting rate {rate}")
        _check(lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0), f"setting pitch {pitch}")
        self._settings = (voice, rate, pitch)


def _libc_srand() -> Callable[[int], None]:
    # The wheel's libespeak-ng calls the C library's rand(), whose state is process-wide: the process's own libc.
    try:
        srand = ctypes.CDLL(None).srand
    except (OSError, AttributeError) as exc:
        raise TTSError(
            f"eSpeak NG: cannot find the C library's srand() to make synthesis repeatable ({exc})", provider="espeak"
        ) from None
    srand.argtypes = [ctypes.c_uint]
    srand.restype = None
    return cast("Callable[[int], None]", srand)


def _wavegen_state(lib: ctypes.CDLL, path: str) -> dict[str, ctypes.c_int]:
    # The statics in _WAVEGEN_STATE are found through the library file's ELF symbol table (local symbols such as
    # "Flutter_ix.5965"), relative to the exported espeak_Synth. A library without them (stripped, another build)
    # yields {}: synthesis still works, only not repeatably.
    wanted = {*_WAVEGEN_STATE, "espeak_Synth"}
    try:
        symbols = _elf_symbols(Path(path).read_bytes(), wanted)
    except (OSError, ValueError, struct.error):
        return {}
    if set(symbols) != wanted:
        return {}
    base = ctypes.cast(lib.espeak_Synth, ctypes.c_void_p).value
    if base is None:
        return {}
    base -= symbols.pop("espeak_Synth")
    return {name: ctypes.c_int.from_address(base + address) for name, address in symbols.items()}


def _elf_symbols(image: bytes, wanted: set[str]) -> dict[str, int]:
    # Values of the symbols named in `wanted` (ignoring a ".N" suffix) in a little-endian ELF64 image's .symtab;
    # a name defined more than once is left out.
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    (section_offset,) = struct.unpack_from("<Q", image, 0x28)
    section_size, section_count = struct.unpack_from("<HH", image, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", image, section_offset + i * section_size) for i in range(section_count)
    ]
    found: dict[str, list[int]] = {}
    for _, kind, _, _, offset, size, link, _, _, entry_size in sections:
        if kind != 2 or not entry_size:  # SHT_SYMTAB
            continue
        names = sections[link][4]
        for start in range(offset, offset + size, entry_size):
            name_offset, _, _, shndx, value, _ = struct.unpack_from("<IBBHQQ", image, start)
            name = image[names + name_offset : image.index(b"\0", names + name_offset)].decode("ascii", "replace")
            name = name.split(".", 1)[0]
            if name in wanted and shndx != 0:
                found.setdefault(name, []).append(value)
    return {name: values[0] for name, values in found.items() if len(set(values)) == 1}


def _check(result: int, action: str) -> None:
    if result != _EE_OK:
        raise TTSError(f"eSpeak NG: {action} failed ({_ERRORS.get(result, f'error {result}')})", provider="espeak")


_engine: EspeakEngine | None = None
_engine_lock = threading.Lock()


def load_process_engine() -> EspeakEngine:
    """This process's EspeakEngine, its library loaded (offline workers load it as they start)."""
    global _engine  # noqa: PLW0603 - eSpeak's state is process-global, so its engine is too
    with _engine_lock:
        if _engine is None:
            _engine = EspeakEngine()
    _engine.load()
    return _engine


def speak_pcm(
    text: str,
    *,
    voice: str = "en-us",
    rate: int = 175,
    pitch: int = 50,
    sample_rate: int = NATIVE_SAMPLE_RATE,
    variant: int = 0,
) -> PcmAudio:
    """`text` spoken as PCM at `sample_rate` by this process's engine; blocks, so run it off the event loop.

    The audio depends only on the arguments. `variant` 0 is the one rendition the cache holds; another starts
    eSpeak's pitch flutter and noise elsewhere, as an earlier synthesis would, for naturally varied test speech.
    """
    samples = load_process_engine().synthesize(text, voice, rate, pitch, variant)
    if sample_rate != NATIVE_SAMPLE_RATE:
        samples = resample(samples, NATIVE_SAMPLE_RATE, sample_rate)
    return PcmAudio(samples=samples, sample_rate=sample_rate)


def speak_ulaw(text: str, voice: str, rate: int, pitch: int) -> bytes:
    """`text` spoken as μ-law 8 kHz by this process's engine: EspeakTTS's job for offline workers."""
    return pcm16_to_ulaw(speak_pcm(text, voice=voice, rate=rate, pitch=pitch, sample_rate=8000).samples)


_SpeechKey = tuple[str, str, int, int]


class SpeechCache:
    """A bounded LRU of finished μ-law audio keyed by (text, voice, rate, pitch); used from one event loop."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 8 * 1024 * 1024) -> None:
        """Create a cache holding at most `max_entries` texts and `max_bytes` of audio."""
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[_SpeechKey, bytes] = OrderedDict()
        self._bytes = 0
        self._pending: dict[_SpeechKey, asyncio.Future[bytes]] = {}

    def __len__(self) -> int:
        """Number of texts held."""
        return len(self._entries)

    async def get_or_render(self, key: _SpeechKey, render: Callable[[], asyncio.Future[bytes]]) -> bytes:
        """The audio for `key`, rendering it once however many callers ask for it at the same time."""
        audio = self._entries.get(key)
        if audio is not None:
            self._entries.move_to_end(key)
            return audio
        pending = self._pending.get(key)
        if pending is None:
            pending = render()
            self._pending[key] = pending
            pending.add_done_callback(lambda done: self._settle(key, done))
        # Shielded: one caller hanging up must not cancel the audio others are waiting for.
        return await asyncio.shield(pending)

    def _settle(self, key: _SpeechKey, done: asyncio.Future[bytes]) -> None:
        del self._pending[key]
        if done.cancelled() or done.exception() is not None:
            return
        audio = done.result()
        if len(audio) > self.max_bytes:
            return
        self._entries[key] = audio
        self._bytes += len(audio)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted)


_speech_cache = SpeechCache()


class EspeakTTS:
    """A call's eSpeak NG synthesizer (TextToSpeech): μ-law 8 kHz in 100 ms chunks, from the shared cache if it can.

    `work` is where synthesis runs: the engine's OfflineWorkers, or `INLINE` (on the event loop) for tests and
    tools that have no engine.
    """

    def __init__(
        self,
        *,
        work: OfflineWork,
        voice: str = "en-us",
        rate: int = 175,
        pitch: int = 50,
        cache: SpeechCache | None = None,
    ) -> None:
        """Create a synthesizer; `cache` defaults to the process's shared one."""
        self.voice = voice
        self.rate = rate
        self.pitch = pitch
        self._work = work
        self._cache = _speech_cache if cache is None else cache

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        """Speak one text as μ-law 8 kHz chunks of CHUNK_BYTES (the last may be shorter); raise TTSError on failure."""
        audio = await self._cache.get_or_render((text, self.voice, self.rate, self.pitch), lambda: self._render(text))
        for start in range(0, len(audio), CHUNK_BYTES):
            yield audio[start : start + CHUNK_BYTES]

    async def close(self) -> None:
        """Nothing to release: the engine and cache belong to the process."""

    def _render(self, text: str) -> asyncio.Future[bytes]:
        async def render() -> bytes:
            try:
                return await self._work.run(speak_ulaw, text, self.voice, self.rate, self.pitch)
            except OfflineWorkError as exc:
                raise TTSError(f"eSpeak NG: {exc}") from exc

        return asyncio.ensure_future(render())
