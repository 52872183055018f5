"""Per-call voice-activity detection on 20 ms frames of 8 kHz PCM16, with start/stop hysteresis."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import webrtcvad

from media.g711 import FRAME_BYTES, FRAME_MS, SAMPLE_RATE, ulaw_to_pcm16, ulaw_to_pcm16_bytes

PCM_FRAME_BYTES = FRAME_BYTES * 2
"""Bytes in one 20 ms frame of 8 kHz 16-bit PCM (320)."""

_ULAW_FLOAT32 = ulaw_to_pcm16(bytes(range(256))).astype(np.float32)
"""Each μ-law code's PCM16 sample, as float32."""


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The caller started speaking; `at_ms` is where speech began on the call's timeline."""

    at_ms: int


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """The caller stopped speaking at `at_ms` after `speech_ms` of voiced audio in the utterance."""

    at_ms: int
    speech_ms: int


VadEvent = SpeechStarted | SpeechStopped
"""An event emitted by VoiceActivityDetector.process."""


class VoiceActivityDetector:
    """WebRTC VAD per frame, turned into utterance start/stop events by hysteresis.

    A frame counts as voiced when WebRTC VAD flags it and its level is above `energy_floor_dbfs`; the
    floor removes WebRTC's own hangover after a click, so only `start_ms` of sustained speech starts an
    utterance and only `stop_ms` of sustained non-speech ends it. Timestamps count 20 ms per frame
    processed, from 0 at the first frame.
    """

    def __init__(
        self,
        aggressiveness: int = 2,
        start_ms: int = 60,
        stop_ms: int = 700,
        energy_floor_dbfs: float = -50.0,
    ) -> None:
        """Create a detector; `start_ms` and `stop_ms` are rounded up to whole 20 ms frames."""
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0, 1, 2 or 3, got {aggressiveness}")
        if start_ms <= 0 or stop_ms <= 0:
            raise ValueError(f"start_ms and stop_ms must be positive, got {start_ms} and {stop_ms}")
        self._vad = webrtcvad.Vad(aggressiveness)
        self._start_frames = math.ceil(start_ms / FRAME_MS)
        self._stop_frames = math.ceil(stop_ms / FRAME_MS)
        # Compare the sum of squares of a frame directly, so no sqrt or log per frame.
        samples_per_frame = PCM_FRAME_BYTES // 2
        floor_amplitude = 32768.0 * 10 ** (energy_floor_dbfs / 20)
        self._energy_floor = samples_per_frame * floor_amplitude**2
        # The μ-law codes of samples quieter than the floor: a frame made only of them has less energy than the
        # floor (its mean square is at most its peak's square), so it is not voiced, decoded or not.
        levels = np.abs(ulaw_to_pcm16(bytes(range(256))).astype(np.float64))
        self._quiet_codes = bytes(np.flatnonzero(levels < floor_amplitude).tolist())
        # The codes of samples loud enough that one alone puts a frame over the floor (with 1% to spare for the
        # float32 sum): a frame holding one is over it without its level being computed (most speech frames).
        self._loud_codes = bytes(np.flatnonzero(levels**2 >= 1.01 * self._energy_floor).tolist())
        self.last_frame_voiced = False
        """Whether the frame just processed was speech (for timing when the caller stopped talking)."""
        self._frames = 0
        self._voiced_run = 0
        self._silent_run = 0
        self._utterance_voiced = 0
        self._speaking = False

    @property
    def speaking(self) -> bool:
        """Whether an utterance is in progress (started and not yet stopped)."""
        return self._speaking

    @property
    def speech_ms(self) -> int:
        """Voiced milliseconds in the current utterance; 0 when nobody is speaking."""
        return self._utterance_voiced * FRAME_MS if self._speaking else 0

    @property
    def elapsed_ms(self) -> int:
        """Milliseconds of audio processed so far."""
        return self._frames * FRAME_MS

    def is_voiced(self, pcm_frame: bytes | bytearray) -> bool:
        """Whether a single 20 ms PCM16 frame is speech, with no effect on the utterance state."""
        if len(pcm_frame) != PCM_FRAME_BYTES:
            raise ValueError(f"VAD frame must be {PCM_FRAME_BYTES} bytes of 8 kHz PCM16, got {len(pcm_frame)}")
        samples = np.frombuffer(pcm_frame, dtype=np.int16).astype(np.float32)
        if float(np.dot(samples, samples)) < self._energy_floor:
            return False
        return bool(self._vad.is_speech(pcm_frame, SAMPLE_RATE))

    def process(self, pcm_frame: bytes | bytearray) -> VadEvent | None:
        """Feed one 20 ms frame of 8 kHz PCM16 (320 bytes) and return the event it causes, if any."""
        return self._advance(self.is_voiced(pcm_frame))

    def process_ulaw(self, ulaw_frame: bytes) -> VadEvent | None:
        """`process` for one 20 ms frame of 8 kHz μ-law (160 bytes), as Twilio sends it.

        A frame with no sample above the energy floor (most of a call's silence) is settled without decoding it.
        """
        if len(ulaw_frame) != FRAME_BYTES:
            raise ValueError(f"VAD frame must be {FRAME_BYTES} bytes of 8 kHz μ-law, got {len(ulaw_frame)}")
        if not ulaw_frame.translate(None, self._quiet_codes):
            return self._advance(False)
        if len(ulaw_frame.translate(None, self._loud_codes)) == FRAME_BYTES:
            # No sample is over the floor alone: the level straight from the codes (the same float32 samples
            # is_voiced would square). Decoded only for WebRTC, and only when the frame is above the floor.
            samples = _ULAW_FLOAT32.take(np.frombuffer(ulaw_frame, dtype=np.uint8))
            if float(np.dot(samples, samples)) < self._energy_floor:
                return self._advance(False)
        return self._advance(bool(self._vad.is_speech(ulaw_to_pcm16_bytes(ulaw_frame), SAMPLE_RATE)))

    def _advance(self, voiced: bool) -> VadEvent | None:
        self._frames += 1
        self.last_frame_voiced = voiced
        if not self._speaking:
            self._voiced_run = self._voiced_run + 1 if voiced else 0
            if self._voiced_run < self._start_frames:
                return None
            self._speaking = True
            self._utterance_voiced = self._voiced_run
            self._silent_run = 0
            return SpeechStarted(at_ms=(self._frames - self._voiced_run) * FRAME_MS)
        if voiced:
            self._utterance_voiced += 1
            self._silent_run = 0
            return None
        self._silent_run += 1
        if self._silent_run < self._stop_frames:
            return None
        event = SpeechStopped(
            at_ms=(self._frames - self._silent_run) * FRAME_MS,
            speech_ms=self._utterance_voiced * FRAME_MS,
        )
        self._speaking = False
        self._voiced_run = 0
        self._utterance_voiced = 0
        return event
