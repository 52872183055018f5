"""Streaming int16 sample-rate conversion between the rates our providers use (8, 16, 22.05, 24 kHz)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

SUPPORTED_RATES = frozenset({8000, 16000, 22050, 24000})
"""Sample rates, in Hz, that StreamResampler converts between."""


class StreamResampler:
    """Resample a mono int16 stream chunk by chunk, with filter state carried across chunks."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        """Create a resampler from `in_rate` to `out_rate` Hz; both must be in SUPPORTED_RATES."""
        for name, rate in (("in_rate", in_rate), ("out_rate", out_rate)):
            if rate not in SUPPORTED_RATES:
                raise ValueError(f"{name}: {rate} Hz is not supported; use one of {sorted(SUPPORTED_RATES)}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality="HQ")

    def process(self, samples: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
        """Feed one chunk and return the output samples that are ready so far."""
        if self.in_rate == self.out_rate:
            return np.asarray(samples, dtype=np.int16)
        chunk = np.ascontiguousarray(samples, dtype=np.int16)
        out: npt.NDArray[np.int16] = self._stream.resample_chunk(chunk, last=False)
        return out

    def flush(self) -> npt.NDArray[np.int16]:
        """Return the samples still held in the filter at the end of the stream."""
        if self.in_rate == self.out_rate:
            return np.zeros(0, dtype=np.int16)
        out: npt.NDArray[np.int16] = self._stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        return out


def resample(samples: npt.NDArray[np.int16], in_rate: int, out_rate: int) -> npt.NDArray[np.int16]:
    """A whole buffer resampled from `in_rate` to `out_rate` Hz (both in SUPPORTED_RATES)."""
    resampler = StreamResampler(in_rate, out_rate)
    return np.concatenate([resampler.process(samples), resampler.flush()])
