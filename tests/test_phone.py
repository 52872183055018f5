"""One rule for phone numbers: config.phone.e164, and the same verdict through every entry point that takes a number.

The table goes through POST /v1/calls, a campaign's CSV import, POST /v1/phone-numbers and the model's
`transfer_call`, and each of them accepts exactly the numbers the others accept.
"""

from __future__ import annotations

import asyncpg
import phonenumbers
import pytest
from openai import AsyncOpenAI

from config.agent import OpenAILLMConfig, parse_agent_configuration
from config.phone import InvalidPhoneNumber, e164
from pipelines.conversation.transfer_rules import TransferRules
from pipelines.llm.base import ConversationTurn, TransferCall
from pipelines.llm.openai_chat import OpenAIChatLLM
from tests.fakes.openai_chat import FakeOpenAI, ToolCall
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_api_campaigns import new_campaign

KEY = "sk-test-phone"
CALLER_ID = "+15550188001"

# (what someone wrote, its E.164 form or None when it must be refused everywhere)
NUMBERS = [
    ("+1 (415) 555-2671", "+14155552671"),
    ("+1 555 010 0199", "+15550100199"),  # a fictional demo number: possible, though in no assigned range
    ("+44 20 7946 0958", "+442079460958"),
    ("tel:+49-30-1234567", "+49301234567"),
    ("+1555", None),
    ("+1 555 0100 99999999", None),
    ("5550100", None),
    ("+999 1234 5678", None),
    ("+1 415 555 2671 ext. 12", None),
    ("call me maybe", None),
]

VALID_DESTINATIONS = parse_agent_configuration(
    {"transfer": {"destinations": [{"number": number, "label": number} for _, number in NUMBERS if number is not None]}}
)
"""An agent that may transfer to each valid number of the table, so only the number's validity decides."""


# ---------------------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("+15555550100", "+15555550100"),
        ("+44 20 7183 8750", "+442071838750"),
        ("tel:+1-555-555-0100", "+15555550100"),
        ("  +1 (555) 555-0100 ", "+15555550100"),
    ],
)
def test_international_numbers_normalise_to_e164(given: str, expected: str) -> None:
    assert e164(given) == expected


@pytest.mark.parametrize("garbage", ["abc", "123", "", "+123", "+1555555010", "+15555550100 ext. 12"])
def test_text_that_is_not_a_dialable_number_is_refused_naming_it(garbage: str) -> None:
    with pytest.raises(InvalidPhoneNumber) as raised:
        e164(garbage)

    assert raised.value.number == garbage
    assert str(raised.value).startswith(f"{garbage!r} is not a valid phone number (")


def test_a_number_without_its_country_code_is_refused_asking_for_international_form() -> None:
    with pytest.raises(InvalidPhoneNumber, match="no country code; write it in international form"):
        e164("(555) 555-0100")


def test_a_national_number_is_read_in_the_region_given() -> None:
    assert e164("(415) 555-2671", region="US") == "+14155552671"
    assert e164("030 1234567", region="DE") == "+49301234567"
    assert e164("+44 20 7946 0958", region="US") == "+442079460958"


def test_a_local_number_without_its_area_code_is_refused() -> None:
    with pytest.raises(InvalidPhoneNumber, match="area code"):
        e164("253 0000", region="US")


@pytest.mark.parametrize(
    ("given", "reason"),
    [("+1555", "too short for its country"), ("+1 555 0100 99999999", "too long for its country")],
)
def test_a_wrong_length_is_named(given: str, reason: str) -> None:
    with pytest.raises(InvalidPhoneNumber) as raised:
        e164(given)

    assert raised.value.reason == reason


# ------------------------------------------------------------------------------------------ the entry points


@pytest.fixture(scope="module")
async def tenant(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Numbers")


@pytest.mark.parametrize(("given", "expected"), NUMBERS)
async def test_calls_refuse_exactly_the_numbers_the_rule_refuses(
    api: Api, tenant: Tenant, given: str, expected: str | None
) -> None:
    status, body = await api.call(
        "POST", "/calls", tenant.owner_key, json={"agentId": "any", "fromNumber": CALLER_ID, "to": given}
    )

    if expected is None:
        assert (status, body["error"]["field"]) == (422, "to"), body
        assert f"to: {given!r} is not a valid phone number" in body["error"]["message"]
    else:  # past the number check: this engine has no Twilio to place calls with
        assert (status, body["error"]["code"]) == (503, "outbound_unavailable"), body


@pytest.fixture(scope="module")
async def unclassified_allowed(api: Api, tenant: Tenant) -> None:
    """The tenant dials numbers of no known type (the table's fictional one) in every country, so that only
    config.phone's rule decides here; the dial policy that refuses them by default is tests/test_dial_policy.py's."""
    everywhere = {"allowedKinds": ["unclassified"], "allowedCountries": sorted(phonenumbers.SUPPORTED_REGIONS)}
    status, body = await api.call("PATCH", "/organization/dial-policy", tenant.owner_key, json=everywhere)
    assert status == 200, body


@pytest.mark.parametrize(("given", "expected"), NUMBERS)
@pytest.mark.usefixtures("unclassified_allowed")
async def test_a_campaign_csv_keeps_as_errors_exactly_the_numbers_the_rule_refuses(
    api: Api, pool: asyncpg.Pool, tenant: Tenant, given: str, expected: str | None
) -> None:
    campaign = await new_campaign(api, pool, tenant)
    path = f"/campaigns/{campaign['id']}/recipients"

    status, summary = await api.call("POST", path, tenant.owner_key, json={"csv": f"phone,name\n{given},Ada\n"})
    assert status == 200, summary
    _, page = await api.call("GET", path, tenant.owner_key)

    [recipient] = page["data"]
    if expected is None:
        assert (recipient["status"], recipient["phoneNumber"]) == ("ERROR", given)
        reason = await pool.fetchval(
            'SELECT "lastReason" FROM "CampaignRecipientDispatch" WHERE "recipientId" = $1', recipient["id"]
        )
        assert reason.startswith(f"line 2: {given!r} is not a valid phone number")
    else:
        assert (recipient["status"], recipient["phoneNumber"]) == ("READY", expected)


@pytest.mark.parametrize(("given", "expected"), NUMBERS)
async def test_adding_a_phone_number_refuses_exactly_the_numbers_the_rule_refuses(
    api: Api, tenant: Tenant, given: str, expected: str | None
) -> None:
    status, body = await api.call("POST", "/phone-numbers", tenant.owner_key, json={"phoneNumber": given})

    if expected is None:
        assert (status, body["error"]["field"]) == (422, "phoneNumber"), body
        assert body["error"]["message"].startswith(f"{given!r} is not a valid phone number")
    else:
        assert (status, body["phoneNumber"]) == (201, expected), body


@pytest.mark.parametrize(("given", "expected"), NUMBERS)
async def test_the_transfer_tool_refuses_exactly_the_numbers_the_rule_refuses(given: str, expected: str | None) -> None:
    async with FakeOpenAI(api_key=KEY) as fake:
        fake.replies.extend([[ToolCall("transfer_call", {"phone_number": given})], "What number was that?"])
        client = AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0)
        llm = OpenAIChatLLM(
            OpenAILLMConfig(),
            client=client,
            instructions="Transfer when asked.",
            tools=None,
            transfer=TransferRules.from_config(VALID_DESTINATIONS.transfer),
        )
        events = [event async for event in llm.respond([ConversationTurn("caller", "Transfer me")])]
        await client.close()

    if expected is None:
        result = fake.requests[1]["messages"][-1]
        assert result["role"] == "tool"
        assert result["content"].startswith(f"error: {given!r} is not a valid phone number")
    else:
        assert events == [TransferCall(expected, "the agent transferred the call", asked={"phone_number": given})]
