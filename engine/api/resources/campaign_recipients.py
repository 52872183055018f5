"""/v1/campaigns/{campaignId}/recipients: each recipient of a campaign and where its dialing stands.

The dispatch states the engine keeps (storage/campaign_states.py) are shown under stable lowercase names; a
recipient imported from a bad line is `error`, with the line (or list index) and the reason.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from engine.api.models import ResponseModel
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from engine.campaigns.recipients_csv import import_error
from storage import campaigns, recipient_states
from storage.campaign_states import RecipientDispatchState
from storage.enums import RecipientStatus
from storage.recipient_states import RecipientDispatch

resource = Resource(
    "Campaign recipients",
    "Each recipient of a campaign and where its dialing stands: waiting, dialing, in a call, done, failed, "
    "do-not-call, or an import error with its line and reason; attempts so far, the last and the next.",
)

RecipientState = Literal["waiting", "dialing", "in_call", "done", "failed", "do_not_call", "error", "canceled"]

API_STATES: dict[str, RecipientState] = {
    RecipientDispatchState.QUEUED: "waiting",
    RecipientDispatchState.DIALING: "dialing",
    RecipientDispatchState.IN_CALL: "in_call",
    RecipientDispatchState.DONE: "done",
    RecipientDispatchState.FAILED: "failed",
    RecipientDispatchState.INVALID: "error",
    RecipientDispatchState.CANCELED: "canceled",
    "DO_NOT_CALL": "do_not_call",  # the do-not-call list's state, by its stored name
}
"""The API name of each stored dispatch state."""
STORED_STATES: dict[RecipientState, list[str]] = {}
for _stored, _shown in API_STATES.items():
    STORED_STATES.setdefault(_shown, []).append(str(_stored))


class RecipientImportError(ResponseModel):
    """Why an imported row could not be dialed, and where it was."""

    at: str = Field(description="`line 7` of a CSV file (the header is line 1), or `recipients[3]` of a JSON list.")
    line: int | None = Field(description="The CSV line, for a file import.")
    reason: str


class RecipientView(ResponseModel):
    """A recipient and its dispatch state."""

    id: str
    campaign_id: str
    name: str | None
    phone_number: str
    notes: str | None
    status: RecipientStatus = Field(description="READY, or ERROR for a row the import could not use.")
    state: RecipientState = Field(
        description="waiting (for its next attempt), dialing, in_call, done (reached), failed (attempts used up or "
        "not retried), do_not_call, error (never dialed: see `error`), canceled (its campaign was stopped)."
    )
    attempts: int = Field(description="Attempts so far; a dial that never reached Twilio does not count.")
    last_attempt_at: datetime | None
    last_call_log_id: str | None = Field(description="The CallLog of the last attempt, once it has one.")
    next_attempt_at: datetime | None = Field(
        description="When it is due next (its calling window permitting); only while waiting. A recipient due since "
        "it was added shows when it was added."
    )
    last_outcome: str | None = Field(description="completed, busy, no-answer, voicemail or failed.")
    last_reason: str | None
    error: RecipientImportError | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: RecipientDispatch) -> RecipientView:
        """The view of a stored recipient."""
        state = API_STATES.get(row.state)
        if state is None:
            raise ValueError(f"recipient {row.id} is in dispatch state {row.state}, which the API has no name for")
        error = None
        if state == "error":
            found = import_error(row.last_reason or "")
            error = RecipientImportError(at=found.at, line=found.line, reason=found.reason)
        return cls(
            id=row.id,
            campaign_id=row.campaign_id,
            name=row.name,
            phone_number=row.phone_number,
            notes=row.notes,
            status=row.status,
            state=state,
            attempts=row.attempts,
            last_attempt_at=row.last_attempt_at,
            last_call_log_id=row.last_call_log_id,
            # Stored, "due at once" is the epoch (the dispatcher's marker): shown as when it became due, its adding.
            next_attempt_at=max(row.next_attempt_at, row.created_at) if state == "waiting" else None,
            last_outcome=row.last_outcome,
            last_reason=None if state == "error" else row.last_reason,
            error=error,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class RecipientQuery(PageQuery):
    """A page of recipients (in id order), optionally in one status or one dispatch state."""

    status: RecipientStatus | None = None
    state: RecipientState | None = None


@resource.get(
    "/campaigns/{campaignId}/recipients",
    summary="List recipients",
    response=Page[RecipientView],
    query=RecipientQuery,
)
async def list_recipients(call: ApiCall) -> Page[RecipientView]:
    """The campaign's recipients, their dispatch state and attempts, in id order (ids are random: not the order the
    recipients were added, but the same order on every page)."""
    query = call.query_as(RecipientQuery)
    organization_id, campaign_id = call.caller.organization_id, call.path["campaignId"]
    position = query.position()
    async with call.tenant() as db:
        await campaigns.get_campaign(db, organization_id=organization_id, campaign_id=campaign_id)
        rows = await recipient_states.list_recipient_states(
            db,
            organization_id=organization_id,
            campaign_id=campaign_id,
            status=query.status,
            states=STORED_STATES[query.state] if query.state else None,
            limit=query.fetch_limit,
            after_id=position[1] if position else None,
        )
    return to_page(Page[RecipientView], [RecipientView.of(row) for row in rows], query)


@resource.get("/campaigns/{campaignId}/recipients/{recipientId}", summary="Get a recipient", response=RecipientView)
async def get_recipient(call: ApiCall) -> RecipientView:
    """One recipient of the campaign and its dispatch state; 404 if the campaign or the recipient is not there."""
    async with call.tenant() as db:
        row = await recipient_states.get_recipient_state(
            db,
            organization_id=call.caller.organization_id,
            campaign_id=call.path["campaignId"],
            recipient_id=call.path["recipientId"],
        )
    return RecipientView.of(row)
