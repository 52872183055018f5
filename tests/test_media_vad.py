"""VoiceActivityDetector: utterance events from synthetic voiced audio, silence and clicks."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from media.g711 import FRAME_BYTES, pcm16_to_ulaw, ulaw_to_pcm16
from media.vad import PCM_FRAME_BYTES, SpeechStarted, SpeechStopped, VadEvent, VoiceActivityDetector

RATE = 8000


def silence(ms: int) -> npt.NDArray[np.int16]:
    return np.zeros(RATE * ms // 1000, dtype=np.int16)


def line_noise(ms: int, seed: int = 0) -> npt.NDArray[np.int16]:
    """Quiet hiss around -60 dBFS, like an open phone line."""
    return np.random.default_rng(seed).normal(0, 30, RATE * ms // 1000).astype(np.int16)


def voiced(ms: int) -> npt.NDArray[np.int16]:
    """A vowel-like sound: harmonics of 150 Hz, amplitude-modulated at 4 Hz like syllables."""
    t = np.arange(RATE * ms // 1000) / RATE
    k = np.arange(1, 20)[:, np.newaxis]
    harmonics = (np.sin(2 * np.pi * 150 * k * t) / k).sum(axis=0)
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    signal: npt.NDArray[np.float64] = harmonics * envelope
    peak = float(np.abs(signal).max())
    return (signal * (8000 / peak)).astype(np.int16)


def run(detector: VoiceActivityDetector, audio: npt.NDArray[np.int16]) -> list[VadEvent]:
    frames = audio.tobytes()
    events = [detector.process(frames[i : i + PCM_FRAME_BYTES]) for i in range(0, len(frames), PCM_FRAME_BYTES)]
    return [event for event in events if event is not None]


def test_synthetic_voice_is_flagged_as_speech_by_webrtc_vad() -> None:
    frames = voiced(1000).tobytes()
    detector = VoiceActivityDetector()
    flags = [detector.is_voiced(frames[i : i + PCM_FRAME_BYTES]) for i in range(0, len(frames), PCM_FRAME_BYTES)]
    assert all(flags)


def test_silence_and_line_noise_produce_no_events() -> None:
    detector = VoiceActivityDetector()
    assert run(detector, np.concatenate([silence(2000), line_noise(3000)])) == []
    assert not detector.speaking


def test_an_utterance_produces_started_then_stopped_at_its_edges() -> None:
    detector = VoiceActivityDetector(stop_ms=700)
    audio = np.concatenate([line_noise(500), voiced(1000), line_noise(1500, seed=1)])
    assert run(detector, audio) == [SpeechStarted(at_ms=500), SpeechStopped(at_ms=1500, speech_ms=1000)]


def test_started_is_emitted_only_after_start_ms_of_speech() -> None:
    detector = VoiceActivityDetector(start_ms=60)
    assert run(detector, np.concatenate([silence(100), voiced(40)])) == []
    assert run(detector, voiced(20)) == [SpeechStarted(at_ms=100)]
    assert detector.elapsed_ms == 160


def test_stopped_is_emitted_only_after_stop_ms_of_silence() -> None:
    detector = VoiceActivityDetector(stop_ms=700)
    run(detector, voiced(500))
    assert run(detector, silence(680)) == []
    assert detector.speaking
    assert run(detector, silence(20)) == [SpeechStopped(at_ms=500, speech_ms=500)]
    assert not detector.speaking


def test_pauses_shorter_than_stop_ms_keep_one_utterance() -> None:
    detector = VoiceActivityDetector(stop_ms=700)
    audio = np.concatenate([voiced(400), silence(300), voiced(400), silence(800)])
    assert run(detector, audio) == [SpeechStarted(at_ms=0), SpeechStopped(at_ms=1100, speech_ms=800)]


def test_clicks_shorter_than_start_ms_produce_no_events() -> None:
    detector = VoiceActivityDetector(start_ms=60)
    click = voiced(40)
    audio = np.concatenate([silence(200), click, silence(300), click, silence(300)])
    assert run(detector, audio) == []


def test_speech_ms_grows_while_the_caller_speaks() -> None:
    detector = VoiceActivityDetector(start_ms=60)
    run(detector, voiced(60))
    assert detector.speech_ms == 60
    run(detector, voiced(240))
    assert detector.speech_ms == 300


def test_speech_ms_is_zero_when_nobody_speaks() -> None:
    detector = VoiceActivityDetector(stop_ms=200)
    run(detector, np.concatenate([voiced(300), silence(200)]))
    assert detector.speech_ms == 0


def test_a_frame_of_the_wrong_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be 320 bytes"):
        VoiceActivityDetector().process(b"\x00" * 160)


def test_aggressiveness_outside_0_to_3_is_rejected() -> None:
    with pytest.raises(ValueError, match="aggressiveness"):
        VoiceActivityDetector(aggressiveness=4)


def test_mu_law_frames_get_the_same_decisions_as_their_decoded_audio() -> None:
    """Quiet μ-law frames are settled without decoding; that shortcut must never change a decision."""
    rng = np.random.default_rng(3)
    pieces = [silence(400), line_noise(600), voiced(800), line_noise(300)]
    # Hiss right around the -50 dBFS floor (amplitude ~104), and single spikes above it in near-silence.
    pieces += [rng.normal(0, sigma, RATE * 200 // 1000).astype(np.int16) for sigma in (60, 90, 100, 110, 150)]
    spiky = silence(400)
    spiky[::97] = 120
    pieces += [spiky, voiced(500), silence(1000)]
    # Speech (which WebRTC flags at any level) just under and over the floor: only the level decides.
    speech = voiced(600).astype(np.float64)
    speech /= np.sqrt(np.mean(speech**2))
    pieces += [(speech * rms).astype(np.int16) for rms in (70, 90, 100, 105, 115)]
    # Faint speech with one sample a frame near the level (~1311) that alone reaches the floor: the shortcut for
    # frames holding such a sample must agree with the sum.
    for peak in (1150, 1250, 1290, 1305, 1320, 1340):
        spiked = speech * 25
        spiked[::160] = peak
        pieces.append(spiked.astype(np.int16))
    ulaw = pcm16_to_ulaw(np.concatenate(pieces))
    decoded = ulaw_to_pcm16(ulaw).tobytes()

    by_ulaw, by_pcm = VoiceActivityDetector(), VoiceActivityDetector()
    decisions = []
    for index in range(len(ulaw) // FRAME_BYTES):
        from_ulaw = by_ulaw.process_ulaw(ulaw[index * FRAME_BYTES : (index + 1) * FRAME_BYTES])
        from_pcm = by_pcm.process(decoded[index * PCM_FRAME_BYTES : (index + 1) * PCM_FRAME_BYTES])
        assert from_ulaw == from_pcm
        assert by_ulaw.last_frame_voiced == by_pcm.last_frame_voiced
        decisions.append(by_ulaw.last_frame_voiced)
    assert any(decisions) and not all(decisions)


def test_a_mu_law_frame_of_the_wrong_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="160 bytes"):
        VoiceActivityDetector().process_ulaw(b"\xff" * 80)
