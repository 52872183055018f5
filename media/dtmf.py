"""Touch tones (DTMF) as μ-law 8 kHz audio, played in-band on the media stream.

Twilio's bidirectional stream takes only media, mark and clear, so keys the agent presses go out as the
tones themselves (ITU-T Q.23 frequency pairs), which the far end's DTMF detectors hear like any phone's.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from media.g711 import pcm16_to_ulaw

SAMPLE_RATE = 8000
TONE_MS = 120  # Q.24 asks for at least 40 ms of tone and 40 ms of pause; phone menus like a little more
GAP_MS = 80
PAUSE_MS = 500  # "w"
_LEVEL = 0.35  # each of the two tones, of full scale: about -12 dBm0, well inside detectors' range

_PAIRS = {
    "1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "A": (697, 1633),
    "4": (770, 1209), "5": (770, 1336), "6": (770, 1477), "B": (770, 1633),
    "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "C": (852, 1633),
    "*": (941, 1209), "0": (941, 1336), "#": (941, 1477), "D": (941, 1633),
}  # fmt: skip
DIGITS = frozenset(_PAIRS) | {"w", "W"}


class InvalidDigits(ValueError):
    """Digits outside 0-9, *, #, A-D and w."""


@cache
def _tone(digit: str) -> bytes:
    low, high = _PAIRS[digit]
    t = np.arange(SAMPLE_RATE * TONE_MS // 1000) / SAMPLE_RATE
    wave = _LEVEL * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t))
    ramp = np.minimum(1.0, np.minimum(np.arange(t.size), np.arange(t.size)[::-1]) / 40)  # 5 ms fades: no clicks
    return pcm16_to_ulaw((wave * ramp * 32767).astype(np.int16))


@cache
def _silence(ms: int) -> bytes:
    return pcm16_to_ulaw(np.zeros(SAMPLE_RATE * ms // 1000, dtype=np.int16))


def dtmf_audio(digits: str) -> bytes:
    """The tones for `digits` (0-9, *, #, A-D; w pauses half a second), each followed by a short gap."""
    bad = sorted(set(digits) - DIGITS)
    if not digits or bad:
        raise InvalidDigits(f"cannot dial {digits!r}" + (f": {''.join(bad)!r} are not keys" if bad else ""))
    parts = [_silence(PAUSE_MS) if d in "wW" else _tone(d) + _silence(GAP_MS) for d in digits]
    return b"".join(parts)
