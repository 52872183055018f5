"""The caller's audio as Twilio sends it (μ-law 8 kHz): synthesized speech and WAV files, resampled."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engine.simulator.results import SimulationError
from media.g711 import SAMPLE_RATE, pcm16_to_ulaw
from media.resample import SUPPORTED_RATES, resample

__all__ = ["read_wav", "synthesize_speech"]


def _pcm_to_ulaw_8k(samples: npt.NDArray[np.int16], rate: int, source: str) -> bytes:
    if rate not in SUPPORTED_RATES:
        raise SimulationError(f"{source}: {rate} Hz is not supported; use one of {sorted(SUPPORTED_RATES)}")
    return pcm16_to_ulaw(resample(samples, rate, SAMPLE_RATE))


def read_wav(path: Path) -> bytes:
    """A mono 16-bit WAV file as μ-law 8 kHz; SimulationError if it cannot be read or is another format."""
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (OSError, wave.Error, EOFError) as exc:
        raise SimulationError(f"{path}: cannot read the WAV file ({exc})") from exc
    if channels != 1 or width != 2:
        raise SimulationError(f"{path}: need mono 16-bit PCM, got {channels} channel(s) of {8 * width}-bit samples")
    return _pcm_to_ulaw_8k(np.frombuffer(frames, dtype="<i2").astype(np.int16), rate, str(path))


async def synthesize_speech(text: str, voice: str) -> bytes:
    """`text` spoken by eSpeak NG in `voice`, as μ-law 8 kHz."""
    from pipelines.tts.espeak import speak_pcm

    audio = await asyncio.to_thread(speak_pcm, text, voice=voice)
    return _pcm_to_ulaw_8k(audio.samples, audio.sample_rate, f"eSpeak voice {voice!r}")
