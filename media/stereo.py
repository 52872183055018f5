"""Two μ-law channels of one call (caller, agent) as one stream: interleaved stereo or mixed mono, μ-law or PCM16."""

from __future__ import annotations

import enum

import numpy as np

from media.g711 import pcm16_to_ulaw, ulaw_to_pcm16


class Channels(enum.StrEnum):
    """How the two sides are laid out: stereo (caller left, agent right, interleaved) or mixed into one."""

    STEREO = "stereo"
    MIXED = "mixed"

    @property
    def per_frame(self) -> int:
        """Samples per frame: 2 for stereo, 1 for mixed."""
        return 2 if self is Channels.STEREO else 1


class Encoding(enum.StrEnum):
    """How samples are written: G.711 μ-law bytes, or 16-bit little-endian linear PCM."""

    MULAW = "mulaw"
    PCM16 = "pcm16"


def combine(left: bytes, right: bytes, channels: Channels, encoding: Encoding) -> bytes:
    """The two equally long μ-law channels as one stream; mixing sums the samples, clipped to 16 bits."""
    if len(left) != len(right):
        raise ValueError(f"channels differ in length: {len(left)} and {len(right)} samples")
    if channels is Channels.MIXED:
        mixed = ulaw_to_pcm16(left).astype(np.int32) + ulaw_to_pcm16(right)
        pcm = np.clip(mixed, -32768, 32767).astype(np.int16)
        return pcm16_to_ulaw(pcm) if encoding is Encoding.MULAW else pcm.astype("<i2").tobytes()
    if encoding is Encoding.MULAW:
        frames = np.empty((len(left), 2), dtype=np.uint8)
        frames[:, 0] = np.frombuffer(left, dtype=np.uint8)
        frames[:, 1] = np.frombuffer(right, dtype=np.uint8)
        return frames.tobytes()
    samples = np.empty((len(left), 2), dtype="<i2")
    samples[:, 0] = ulaw_to_pcm16(left)
    samples[:, 1] = ulaw_to_pcm16(right)
    return samples.tobytes()
