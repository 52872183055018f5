"""A call's CallLog in PostgreSQL: batches of turns written with their webhook events, and the call ended in one
transaction (status, metadata, the agent's counters, the charge of its started minutes).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from engine.call.call_outcome import CallOutcome, call_seconds, latency_summary, started_minutes
from storage import Pool, agents, call_events, call_logs, call_turns
from storage.call_logs import CallLog
from storage.call_turns import TurnRecord
from storage.end_reasons import ending
from storage.enums import CallStatus
from storage.errors import NotFound
from storage.records import transaction
from storage.webhook_outbox import WebhookEvent

__all__ = ["CallLogStore"]

log = logging.getLogger(__name__)


class CallLogStore:
    """The statements that write one call's CallLog; each is one attempt, retried by the caller."""

    def __init__(self, pool: Pool, *, organization_id: str, call_log_id: str, agent_id: str | None) -> None:
        """Write the CallLog `call_log_id` of `organization_id` through `pool`."""
        self._pool = pool
        self._organization_id = organization_id
        self._call_log_id = call_log_id
        self._agent_id = agent_id
        self._subscribed = False  # seen a transcript.updated subscription: write turns with their events

    async def write(self, batch: list[TurnRecord], metadata: dict[str, Any]) -> None:
        """Write a batch of turns and metadata, with their webhook events; idempotent."""
        if not self._subscribed:
            # Nobody subscribes to the turns (the usual case): one statement writes them, one round trip.
            if await call_turns.insert_turns_unless_subscribed(
                self._pool,
                organization_id=self._organization_id,
                call_log_id=self._call_log_id,
                turns=batch,
                metadata=metadata,
                event=WebhookEvent.TRANSCRIPT_UPDATED,
                agent_id=self._agent_id,
            ):
                return
            self._subscribed = True  # from now on the turns and their events share a transaction
        async with transaction(self._pool) as conn:
            inserted = await call_turns.insert_turns(
                conn,
                organization_id=self._organization_id,
                call_log_id=self._call_log_id,
                turns=batch,
                metadata=metadata,
            )
            await call_events.enqueue_turns(
                conn, organization_id=self._organization_id, agent_id=self._agent_id, turns=inserted
            )

    async def end(
        self, outcome: CallOutcome, metadata: Mapping[str, Any], *, agent_latencies_ms: Sequence[int], lost_turns: int
    ) -> tuple[CallLog, bool]:
        """End the call in one transaction, with the metadata not yet written; idempotent.

        Returns the final CallLog, and whether this ended it (False: it was ended already).
        """
        async with transaction(self._pool) as conn:
            current = await call_turns.lock_call_log(
                conn, organization_id=self._organization_id, call_log_id=self._call_log_id
            )
            if current is not CallStatus.IN_PROGRESS:
                # Ended already: by an earlier attempt whose acknowledgement was lost, or by crash recovery.
                if current is not outcome.status:
                    log.warning("CallLog %s was already %s; left as it is", self._call_log_id, current)
                # Ended by something else while the call ran (an operator's UPDATE): the credits it still holds are
                # settled on the minutes it ran, as its own ending would have.
                await call_logs.settle_ended_call(
                    conn,
                    organization_id=self._organization_id,
                    call_log_id=self._call_log_id,
                    minutes_charged=started_minutes(call_seconds(outcome.duration_s)),
                )
                ended = await call_logs.get_call_log(
                    conn, organization_id=self._organization_id, call_log_id=self._call_log_id
                )
                return ended, False
            duration = call_seconds(outcome.duration_s)
            final: dict[str, Any] = {
                **metadata,
                **outcome.metadata,
                **ending(outcome.end_reason, outcome.end_detail),
                "latencyMs": latency_summary(agent_latencies_ms),
            }
            if lost_turns:
                final["lostTurns"] = lost_turns
            ended = await call_logs.finalize_call_log(
                conn,
                organization_id=self._organization_id,
                call_log_id=self._call_log_id,
                status=outcome.status,
                duration=duration,
                recording_url=outcome.recording_url,
                metadata=final,
                minutes_charged=started_minutes(duration),
                told_live=True,  # the session's call.ended follows its turns' events (engine.call.media_socket)
            )
            if self._agent_id is not None:
                try:
                    # Its successRate moved with the CallLog's status (the CallLog tally trigger, migration 0023).
                    await agents.increment_total_calls(
                        conn, organization_id=self._organization_id, agent_id=self._agent_id
                    )
                except NotFound:
                    log.warning("CallLog %s: its agent %s was deleted during the call", ended.id, self._agent_id)
        return ended, True
