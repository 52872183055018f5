"""G.711 mu-law: bit-exact agreement with the reference coder and stable round trips."""

from __future__ import annotations

import warnings

import numpy as np

from media.g711 import ULAW_SILENCE, pcm16_to_ulaw, ulaw_to_pcm16, ulaw_to_pcm16_bytes

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


def test_every_code_decodes_as_the_reference() -> None:
    codes = bytes(range(256))
    assert ulaw_to_pcm16(codes).tobytes() == audioop.ulaw2lin(codes, 2)


def test_the_bytes_decoder_agrees_with_the_reference() -> None:
    codes = bytes(range(256))
    assert ulaw_to_pcm16_bytes(codes) == audioop.ulaw2lin(codes, 2)
    assert ulaw_to_pcm16_bytes(b"") == b""


def test_every_int16_sample_encodes_as_the_reference() -> None:
    samples = np.arange(-32768, 32768, dtype=np.int16)
    assert pcm16_to_ulaw(samples) == audioop.lin2ulaw(samples.tobytes(), 2)


def test_decoding_then_encoding_returns_the_same_codes() -> None:
    # 0x7F is negative zero: it decodes to 0, which encodes to the positive zero 0xFF.
    codes = bytes(c for c in range(256) if c != 0x7F)
    assert pcm16_to_ulaw(ulaw_to_pcm16(codes)) == codes


def test_encoding_is_stable_after_one_round_trip() -> None:
    samples = np.arange(-32768, 32768, dtype=np.int16)
    once = ulaw_to_pcm16(pcm16_to_ulaw(samples))
    assert np.array_equal(ulaw_to_pcm16(pcm16_to_ulaw(once)), once)


def test_silence_code_decodes_to_zero() -> None:
    assert ulaw_to_pcm16(bytes([ULAW_SILENCE] * 160)).tolist() == [0] * 160


def test_empty_input_gives_empty_output() -> None:
    assert ulaw_to_pcm16(b"").size == 0
    assert pcm16_to_ulaw(np.zeros(0, dtype=np.int16)) == b""
