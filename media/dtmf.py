"""Touch tones (DTMF) as μ-law 8 kHz audio, played in-band on the media stream, and the one rule for valid digits.

Twilio's bidirectional stream takes only media, mark and clear, so keys the agent presses go out as the
tones themselves (ITU-T Q.23 frequency pairs), which the far end's DTMF detectors hear like any phone's.
`check_digits` is the rule every entry point uses; `DIGITS_PATTERN` is the same rule for a JSON schema.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from media.g711 import SAMPLE_RATE, pcm16_to_ulaw

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
"""Every character a digit string may hold: the keys 0-9, *, #, A-D, and w (or W) for a half-second pause."""
MAX_DIGITS = 32
"""The most characters one digit string may have: enough for a menu path and a PIN, at most 16 s of audio."""
# No character of DIGITS is special inside a character class, so the class is written unescaped: JSON schema's
# ECMAScript regular expressions reject escapes such as `\#` that Python's re.escape would add.
DIGITS_PATTERN = f"^[{''.join(sorted(DIGITS))}]{{1,{MAX_DIGITS}}}$"
"""`check_digits`'s rule as a regular expression, for JSON schemas given to a model."""
DIGITS_HELP = f"use 1 to {MAX_DIGITS} of 0-9, *, #, A-D, and w for a half-second pause"
"""What valid digits are, in words, for whoever wrote invalid ones."""


class InvalidDigits(ValueError):
    """A digit string that is empty, longer than MAX_DIGITS, or has characters other than DIGITS."""


def check_digits(digits: str) -> str:
    """`digits` when every character is a key or a pause and there are 1 to MAX_DIGITS of them; else InvalidDigits."""
    bad = sorted(set(digits) - DIGITS)
    if bad:
        raise InvalidDigits(f"cannot dial {digits!r}: {''.join(bad)!r} are not keys")
    if not digits:
        raise InvalidDigits("cannot dial '': no digits")
    if len(digits) > MAX_DIGITS:
        raise InvalidDigits(f"cannot dial {digits!r}: more than {MAX_DIGITS} digits")
    return digits


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
    """The tones for `digits` (0-9, *, #, A-D; w pauses half a second), each followed by a short gap.

    Raises InvalidDigits for what `check_digits` refuses.
    """
    check_digits(digits)
    parts = [_silence(PAUSE_MS) if d in "wW" else _tone(d) + _silence(GAP_MS) for d in digits]
    return b"".join(parts)
