"""How a call ended, and what its end reports and charges: the agent's latency summary and the started minutes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from storage.end_reasons import EndReason
from storage.enums import CallStatus

__all__ = ["CallOutcome", "call_seconds", "latency_summary", "started_minutes"]


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """How a call ended: its final status and why, how long it lasted (s), its recording and extra metadata.

    `end_detail` is free text beside the reason (an error's message, a transfer's number), for people to read.
    """

    status: CallStatus
    end_reason: EndReason
    duration_s: float
    recording_url: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    end_detail: str | None = None


def latency_summary(latencies_ms: Sequence[int]) -> dict[str, int | None]:
    """p50, p95 (nearest rank), max and count of response latencies in ms; None values when there are none."""
    ordered = sorted(latencies_ms)
    if not ordered:
        return {"p50": None, "p95": None, "max": None, "count": 0}

    def rank(percent: int) -> int:
        return ordered[max(math.ceil(percent / 100 * len(ordered)) - 1, 0)]

    return {"p50": rank(50), "p95": rank(95), "max": ordered[-1], "count": len(ordered)}


def call_seconds(duration_s: float) -> int:
    """A call's length in whole seconds, as its CallLog and its call.ended event give it: every second it started,
    so that a call a moment into a new minute is charged that minute (`started_minutes`)."""
    return math.ceil(duration_s)


def started_minutes(duration_s: int) -> int:
    """The minutes a call of that many seconds is charged for: every minute it started."""
    return math.ceil(duration_s / 60)
