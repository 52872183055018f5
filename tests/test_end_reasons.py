"""End reasons: what each stored reason means for a campaign's retry policy, and reading the older stored form."""

from __future__ import annotations

import pytest

from storage.campaign_dispatch import call_outcome
from storage.campaign_states import AttemptOutcome
from storage.end_reasons import MAX_DETAIL_CHARS, NEVER_CONNECTED, VOICEMAIL, EndReason, ending
from storage.enums import CallStatus

# How a call that ended for each reason is finished: Twilio's statuses for calls nobody answered end MISSED
# (failed: FAILED), a voicemail or a conversation COMPLETED, a failure FAILED.
_STATUS = {
    EndReason.BUSY: CallStatus.MISSED,
    EndReason.NO_ANSWER: CallStatus.MISSED,
    EndReason.CANCELED: CallStatus.MISSED,
    **{reason: CallStatus.COMPLETED for reason in VOICEMAIL},
    **{
        reason: CallStatus.COMPLETED
        for reason in (
            EndReason.CALLER_HANGUP,
            EndReason.AGENT_HANGUP,
            EndReason.PATH_END,
            EndReason.TRANSFERRED,
            EndReason.SILENCE_TIMEOUT,
            EndReason.MAX_DURATION,
            EndReason.API_HANGUP,
        )
    },
}
_EXPECTED = {
    EndReason.BUSY: AttemptOutcome.BUSY,
    EndReason.NO_ANSWER: AttemptOutcome.NO_ANSWER,
    EndReason.CANCELED: AttemptOutcome.FAILED,
    EndReason.VOICEMAIL_LEFT: AttemptOutcome.VOICEMAIL,
    EndReason.VOICEMAIL_HANGUP: AttemptOutcome.VOICEMAIL,
}


@pytest.mark.parametrize("reason", list(EndReason))
def test_every_end_reason_has_a_campaign_outcome(reason: EndReason) -> None:
    status = _STATUS.get(reason, CallStatus.FAILED)
    expected = _EXPECTED.get(
        reason, AttemptOutcome.COMPLETED if status is CallStatus.COMPLETED else AttemptOutcome.FAILED
    )
    assert call_outcome(status, ending(reason)) is expected


def test_a_missed_call_with_no_known_reason_counts_as_not_answered() -> None:
    assert call_outcome(CallStatus.MISSED, {}) is AttemptOutcome.NO_ANSWER


@pytest.mark.parametrize(
    ("stored", "outcome"),
    [
        ("voicemail_left: after the beep", AttemptOutcome.VOICEMAIL),
        ("protocol_error: MalformedMessage: not JSON", AttemptOutcome.FAILED),
        ("no_answer", AttemptOutcome.NO_ANSWER),
    ],
)
def test_an_older_stored_reason_with_its_detail_still_classifies(stored: str, outcome: AttemptOutcome) -> None:
    status = CallStatus.COMPLETED if outcome is AttemptOutcome.VOICEMAIL else CallStatus.MISSED
    if stored.startswith("protocol_error"):
        status = CallStatus.FAILED
    assert call_outcome(status, {"endReason": stored}) is outcome


def test_reading_an_older_reason_separates_its_detail() -> None:
    assert EndReason.parse("protocol_error: MalformedMessage: not JSON") == (
        EndReason.PROTOCOL_ERROR,
        "MalformedMessage: not JSON",
    )
    assert EndReason.read("twilio_failed") is EndReason.TWILIO_FAILED
    assert EndReason.parse("the caller is done") == (None, None)


def test_the_reasons_of_unanswered_calls_are_twilios_statuses() -> None:
    assert {reason.value for reason in NEVER_CONNECTED} == {"busy", "no-answer", "canceled", "failed"}


def test_an_ending_keeps_a_bounded_detail_only_when_there_is_one() -> None:
    assert ending(EndReason.STREAM_LOST) == {"endReason": "stream_lost"}
    assert ending(EndReason.STT_FAILED, "y" * 5000) == {"endReason": "stt_failed", "endDetail": "y" * MAX_DETAIL_CHARS}
