"""One call's file in the CallLog spill: its records written in order while the database is away, and read back."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.call.call_log_spill import CallLogSpill, SpillRecord, SpillUnavailable
from engine.call.call_outcome import CallOutcome
from storage.call_turns import TurnRecord
from storage.end_reasons import EndReason
from storage.enums import CallStatus
from storage.errors import DatabaseUnavailable

__all__ = ["CallLogDeferred", "SpilledCall", "SpilledCallFile"]


class CallLogDeferred(DatabaseUnavailable):
    """The database did not take the call's end in time: it is kept in the spill and written when it returns."""


@dataclass(slots=True)
class SpilledCall:
    """What a spill file kept of a call: who it is, its unwritten turns and metadata, and how it ended (if it did)."""

    organization_id: str
    call_log_id: str
    agent_id: str | None
    node_id: str
    turns: list[TurnRecord] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    outcome: CallOutcome | None = None
    agent_latencies_ms: list[int] = field(default_factory=list)
    lost_turns: int = 0

    @classmethod
    def read(cls, records: Sequence[Mapping[str, Any]]) -> SpilledCall:
        """The call a spill file's records describe (ValueError if they do not start with the call's record)."""
        if not records or "call" not in records[0]:
            raise ValueError("a spill file starts with the record of its call")
        call = records[0]["call"]
        spilled = cls(
            organization_id=call["organizationId"],
            call_log_id=call["callLogId"],
            agent_id=call["agentId"],
            node_id=call["engineNode"],
        )
        for record in records[1:]:
            match record:
                case {"turn": dict(turn)}:
                    spilled.turns.append(TurnRecord(**turn))
                case {"metadata": dict(items)}:
                    spilled.metadata.update(items)
                case {"end": dict(end)}:
                    spilled.outcome = CallOutcome(
                        status=CallStatus(end["status"]),
                        end_reason=EndReason(end["endReason"]),
                        end_detail=end.get("endDetail"),
                        duration_s=end["durationS"],
                        recording_url=end["recordingUrl"],
                        metadata=end["metadata"],
                    )
                    spilled.agent_latencies_ms = list(end["agentLatenciesMs"])
                    spilled.lost_turns = end["lostTurns"]
        return spilled


class SpilledCallFile:
    """Writes one call's records to its spill file, in order: the call first, then turns, metadata and its end."""

    def __init__(
        self, spill: CallLogSpill, *, organization_id: str, call_log_id: str, agent_id: str | None, node_id: str
    ) -> None:
        """Keep the call `call_log_id` in `spill`."""
        self._spill = spill
        self._call_log_id = call_log_id
        self._call = {
            "organizationId": organization_id,
            "callLogId": call_log_id,
            "agentId": agent_id,
            "engineNode": node_id,
        }

    @property
    def path(self) -> Path:
        """Where the call's file is."""
        return self._spill.path_of(self._call_log_id)

    def begin(self, metadata: Mapping[str, Any]) -> None:
        """Start the file with the call's record and the metadata not yet written."""
        self._spill.append(self._call_log_id, [{"call": self._call}, {"metadata": dict(metadata)}], bounded=False)

    def add_turns(self, turns: Sequence[TurnRecord]) -> bool:
        """Add turns; False if the spill is full and they were not kept."""
        records: list[SpillRecord] = [{"turn": dataclasses.asdict(turn)} for turn in turns]
        return not turns or self._spill.append(self._call_log_id, records)

    def add_metadata(self, items: Mapping[str, Any]) -> None:
        """Add metadata to merge into the CallLog."""
        self._spill.append(self._call_log_id, [{"metadata": items}], bounded=False)

    async def end(self, outcome: CallOutcome, *, agent_latencies_ms: list[int], lost_turns: int) -> CallLogDeferred:
        """Add the call's end and mark the file complete; return the CallLogDeferred that says where it is kept."""
        end = {
            "status": outcome.status.value,
            "endReason": outcome.end_reason.value,
            "endDetail": outcome.end_detail,
            "durationS": outcome.duration_s,
            "recordingUrl": outcome.recording_url,
            "metadata": dict(outcome.metadata),
            "agentLatenciesMs": agent_latencies_ms,
            "lostTurns": lost_turns,
        }
        self._spill.append(self._call_log_id, [{"end": end}], bounded=False)
        self._spill.release(self._call_log_id)
        where = str(self.path)
        try:
            await self._spill.durable()
        except SpillUnavailable as exc:
            where = f"memory until the spill folder takes it ({exc})"
        message = (
            f"CallLog {self._call_log_id}: the database did not take the call's end; it is kept in {where} and "
            "written when the database returns"
        )
        return CallLogDeferred(message)
