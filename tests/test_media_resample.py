"""StreamResampler: chunked resampling matches one-shot resampling and keeps frequencies."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from media.resample import StreamResampler

RATE_PAIRS = [(8000, 16000), (16000, 8000), (24000, 8000), (8000, 24000), (22050, 8000), (8000, 22050)]


def sine(freq: float, rate: int, seconds: float, amplitude: float = 12000.0) -> npt.NDArray[np.int16]:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def resample_whole(signal: npt.NDArray[np.int16], in_rate: int, out_rate: int) -> npt.NDArray[np.int16]:
    resampler = StreamResampler(in_rate, out_rate)
    return np.concatenate([resampler.process(signal), resampler.flush()])


def resample_in_20ms_chunks(signal: npt.NDArray[np.int16], in_rate: int, out_rate: int) -> npt.NDArray[np.int16]:
    resampler = StreamResampler(in_rate, out_rate)
    step = in_rate // 50
    parts = [resampler.process(signal[i : i + step]) for i in range(0, len(signal), step)]
    return np.concatenate([*parts, resampler.flush()])


@pytest.mark.parametrize(("in_rate", "out_rate"), RATE_PAIRS)
def test_chunked_output_equals_one_piece_output(in_rate: int, out_rate: int) -> None:
    signal = sine(1000, in_rate, 1.0)
    whole = resample_whole(signal, in_rate, out_rate)
    chunked = resample_in_20ms_chunks(signal, in_rate, out_rate)
    n = min(len(whole), len(chunked))
    assert abs(len(whole) - len(chunked)) <= 2
    assert np.max(np.abs(whole[:n].astype(np.int32) - chunked[:n])) <= 2


@pytest.mark.parametrize(("in_rate", "out_rate"), RATE_PAIRS)
def test_output_length_follows_the_rate_ratio(in_rate: int, out_rate: int) -> None:
    signal = sine(1000, in_rate, 1.0)
    expected = len(signal) * out_rate / in_rate
    assert abs(len(resample_in_20ms_chunks(signal, in_rate, out_rate)) - expected) <= 2


@pytest.mark.parametrize(("in_rate", "out_rate"), RATE_PAIRS)
def test_a_440_hz_tone_keeps_its_frequency(in_rate: int, out_rate: int) -> None:
    out = resample_in_20ms_chunks(sine(440, in_rate, 1.0), in_rate, out_rate).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    peak_hz = np.argmax(spectrum) * out_rate / len(out)
    assert peak_hz == pytest.approx(440, abs=2)


def test_equal_rates_pass_samples_through() -> None:
    signal = sine(440, 8000, 0.02)
    resampler = StreamResampler(8000, 8000)
    assert np.array_equal(resampler.process(signal), signal)
    assert resampler.flush().size == 0


def test_unsupported_rate_is_rejected_with_the_supported_list() -> None:
    with pytest.raises(ValueError, match="44100 Hz is not supported"):
        StreamResampler(44100, 8000)
