"""The agent settings outbound calls read: ring timeout and answering-machine detection."""

from __future__ import annotations

import pytest

from config.agent import AgentConfigurationError, parse_agent_configuration
from engine.twilio.outbound_calls import InvalidNumber, dialable_number, machine_detection


def test_an_outbound_call_rings_thirty_seconds_unless_the_agent_says_otherwise() -> None:
    assert parse_agent_configuration({}).ring_timeout_seconds == 30
    assert parse_agent_configuration({"ringTimeoutSeconds": 45}).ring_timeout_seconds == 45


@pytest.mark.parametrize("seconds", [0, 4, 601])
def test_a_ring_timeout_outside_what_twilio_accepts_is_refused(seconds: int) -> None:
    with pytest.raises(AgentConfigurationError, match="ringTimeoutSeconds: must be between 5 and 600"):
        parse_agent_configuration({"ringTimeoutSeconds": seconds})


def test_leaving_a_voicemail_needs_a_message() -> None:
    with pytest.raises(AgentConfigurationError, match="voicemail: action 'leave_message' needs a message"):
        parse_agent_configuration({"voicemail": {"detect": True, "action": "leave_message"}})


def test_machine_detection_is_off_unless_the_voicemail_settings_ask_for_it() -> None:
    assert machine_detection(parse_agent_configuration({}), "https://x/amd") is None


def test_leaving_a_message_waits_for_the_beep_and_hanging_up_takes_the_quickest_verdict() -> None:
    leave = parse_agent_configuration(
        {"voicemail": {"detect": True, "action": "leave_message", "message": "Call us.", "detectionTimeoutSeconds": 12}}
    )
    hang_up = parse_agent_configuration({"voicemail": {"detect": True, "action": "hang_up"}})

    leaving = machine_detection(leave, "https://x/amd")
    hanging = machine_detection(hang_up, "https://x/amd")

    assert leaving is not None and (leaving.mode, leaving.timeout_seconds) == ("DetectMessageEnd", 12)
    assert hanging is not None and (hanging.mode, hanging.callback_url) == ("Enable", "https://x/amd")


def test_numbers_are_dialed_in_e164_form() -> None:
    assert dialable_number("to", "+1 (555) 010-0199") == "+15550100199"
    assert dialable_number("to", "+44 20 7946 0958") == "+442079460958"


def test_an_extension_cannot_be_dialed() -> None:
    with pytest.raises(InvalidNumber, match="extensions"):
        dialable_number("to", "+1 555 010 0199 ext. 12")
