"""Deterministic stand-in embeddings: hashed character trigrams of a text's words, so related texts are near.

"car park" and "carpark" share most trigrams and land close together, where full-text search sees two different
words; texts with no word in common are nearly orthogonal. Used by the fake OpenAI server's /v1/embeddings.
"""

from __future__ import annotations

import hashlib
import math
import re

_WORD = re.compile(r"[^\W_]+")


def hashed_embedding(text: str, dimensions: int) -> list[float]:
    """A unit vector of `dimensions` for `text`: each trigram of each lower-cased word adds ±1 at its hashed slot."""
    vector = [0.0] * dimensions
    for word in _WORD.findall(text.lower()):
        padded = f" {word} "
        for start in range(len(padded) - 2):
            digest = hashlib.blake2b(padded[start : start + 3].encode(), digest_size=8).digest()
            slot = int.from_bytes(digest[:4], "little") % dimensions
            vector[slot] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector] if norm else vector
