"""Call events for webhook subscribers: their payloads, queued in the transaction of the change each reports.

call.started is queued when a media stream takes the call (the write that tags it with its engine node), call.ended
by the UPDATE that ends the call, transcript.updated by each write of new turns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from storage.end_reasons import EndReason
from storage.records import Queryable
from storage.webhook_outbox import WebhookEvent, enqueue_event

if TYPE_CHECKING:
    from storage.call_logs import CallLog
    from storage.call_turns import CallTurn


def call_parties(call_type: str, phone_number: str | None, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A call's `from` and `to` numbers (CallLog.phoneNumber is the other party's; the engine's own is in metadata)."""
    if call_type == "OUTBOUND":
        return {"from": metadata.get("from"), "to": phone_number}
    return {"from": phone_number, "to": metadata.get("to")}


def _call_data(row: Mapping[str, Any] | asyncpg.Record) -> dict[str, Any]:
    return {
        "callLogId": row["id"],
        "callId": row["callId"],
        "callType": str(row["callType"]),
        "agentId": row["agentId"],
        "campaignId": row["campaignId"],
        "customer": row["customer"],
        **call_parties(str(row["callType"]), row["phoneNumber"], row["metadata"]),
        "startedAt": row["timestamp"],
    }


def call_ended_data(call: CallLog, transfer: Mapping[str, Any] | None) -> dict[str, Any]:
    """call.ended's data: the call, how it ended (the reason, and its detail for people), what was said, and the
    leg it was `transfer`red to, if any."""
    reason, detail = EndReason.parse(call.metadata.get("endReason"))
    return {
        **_call_data(call.model_dump(by_alias=True)),
        "status": str(call.status),
        "endReason": reason or call.metadata.get("endReason"),
        "endDetail": call.metadata.get("endDetail", detail),
        "duration": call.duration,
        "transcript": call.transcript,
        "recordingUrl": call.recording_url,
        "summary": call.metadata.get("summary"),
        "transfer": dict(transfer) if transfer is not None else None,
    }


async def enqueue_call_started(conn: Queryable, call: CallLog) -> int:
    """Queue call.started for a call a media stream has just taken (`call_logs.claim_stream`, in its transaction);
    returns how many deliveries were queued."""
    return await enqueue_event(
        conn,
        organization_id=call.organization_id,
        event=WebhookEvent.CALL_STARTED,
        data=_call_data(call.model_dump(by_alias=True)),
        agent_id=call.agent_id,
    )


async def enqueue_call_ended(conn: Queryable, call: CallLog, transfer: Mapping[str, Any] | None) -> int:
    """Queue call.ended for a call that has just ended, with its `transfer` leg (storage.transfer_legs.legs_of);
    returns how many deliveries were queued.

    A transferred call's leg usually still runs when the call (the agent's part) ends: it is told with its
    destination and time limit, and its settlement follows as transfer.ended.
    """
    return await enqueue_event(
        conn,
        organization_id=call.organization_id,
        event=WebhookEvent.CALL_ENDED,
        data=call_ended_data(call, transfer),
        agent_id=call.agent_id,
    )


async def enqueue_turns(
    conn: Queryable, *, organization_id: str, agent_id: str | None, turns: Sequence[CallTurn]
) -> int:
    """Queue transcript.updated for each newly written turn, in order; one query when nobody subscribes."""
    queued = 0
    for turn in turns:
        count = await enqueue_event(
            conn,
            organization_id=organization_id,
            event=WebhookEvent.TRANSCRIPT_UPDATED,
            data={
                "callLogId": turn.call_log_id,
                "agentId": agent_id,
                "turn": {
                    "index": turn.index,
                    "speaker": turn.speaker,
                    "text": turn.text,
                    "startMs": turn.start_ms,
                    "endMs": turn.end_ms,
                    "interrupted": turn.interrupted,
                },
            },
            agent_id=agent_id,
        )
        if count == 0:
            return queued  # nobody subscribes (in this transaction's view): the other turns would find the same
        queued += count
    return queued
