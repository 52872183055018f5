"""The outbound dial policy against toll fraud: POST /v1/calls, campaigns (import and dial) and transfers refuse
premium-rate and the like unless the organization opted in, and by default any country but those of its own numbers,
through one rule (storage.dial_policies), on the real server and database.

Numbers are phonenumbers' own example number of each type, so the tests follow its metadata rather than our guesses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import phonenumbers
import pytest
from phonenumbers import PhoneNumberType

from config.phone import NumberKind, number_kind
from config.settings import load_settings
from engine.campaigns.dispatcher import CampaignDispatcher, DispatchTiming, PlaceCallDialer
from engine.twilio.outbound_calls import OutboundDeps
from engine.twilio.rest import TwilioCalls
from storage import phone_numbers
from storage.dial_policies import DEFAULT_KINDS, DEFAULT_POLICY, OutboundDialPolicy
from storage.tenancy import tenant_transaction
from tests.engine_server import running_engine
from tests.fakes.twilio import Busy, FakeTwilio
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_outbound_calls import finished_log, make_agent


def example(region: str, kind: int) -> str:
    """phonenumbers' example number of `kind` in `region`, in E.164."""
    number = phonenumbers.example_number_for_type(region, kind)
    assert number is not None, (region, kind)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


UK_PREMIUM = example("GB", PhoneNumberType.PREMIUM_RATE)  # +44 90...
UK_MOBILE = example("GB", PhoneNumberType.MOBILE)
US_NUMBER = "+14155550123"
JAMAICA = "+18765550123"  # +1 like the US, but Jamaica's: billed as an international call
DOMINICAN_REPUBLIC = "+18095550123"
POLICY_PATH = "/organization/dial-policy"

_TYPES = {
    kind: getattr(PhoneNumberType, name)
    for kind, name in {
        NumberKind.FIXED_LINE: "FIXED_LINE",
        NumberKind.MOBILE: "MOBILE",
        NumberKind.TOLL_FREE: "TOLL_FREE",
        NumberKind.PREMIUM_RATE: "PREMIUM_RATE",
        NumberKind.SHARED_COST: "SHARED_COST",
        NumberKind.VOIP: "VOIP",
        NumberKind.PERSONAL: "PERSONAL_NUMBER",
        NumberKind.PAGER: "PAGER",
        NumberKind.UAN: "UAN",
        NumberKind.VOICEMAIL: "VOICEMAIL",
    }.items()
}


def first_example(kind: NumberKind) -> str:
    """The example number of `kind` of the first region (alphabetically) whose metadata classifies it so."""
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        number = phonenumbers.example_number_for_type(region, _TYPES[kind])
        if number is not None and number_kind(number) is kind:
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    raise AssertionError(f"no example of {kind}")


def at_home(*countries: str) -> OutboundDialPolicy:
    """The default policy of an organization with numbers in `countries`, as get_policy reads it."""
    return DEFAULT_POLICY.model_copy(update={"home_countries": countries})


def country_of(number: str) -> str:
    region = phonenumbers.region_code_for_number(phonenumbers.parse(number))
    assert region is not None, number
    return region


@pytest.mark.parametrize("kind", sorted(_TYPES))
def test_the_default_policy_dials_plain_voip_and_toll_free_numbers_and_refuses_the_rest(kind: NumberKind) -> None:
    number = first_example(kind)
    policy = at_home(country_of(number))

    refusal = policy.refusal(number)

    if kind in DEFAULT_KINDS:
        assert refusal is None
    else:
        assert refusal is not None and refusal.startswith(
            f"{number} is {kind.described}; this organization does not dial {kind.plural}"
        )
        assert policy.model_copy(update={"allowed_kinds": frozenset({kind})}).refusal(number) is None


def test_by_default_only_the_countries_of_the_organizations_numbers_are_dialed_not_all_of_their_code() -> None:
    # +1 876 and +1 809 look American, but are Jamaica's and the Dominican Republic's: international calls.
    policy = at_home("US")

    assert policy.refusal(US_NUMBER) is None
    assert policy.refusal(JAMAICA) == (
        f"{JAMAICA} is in Jamaica; by default this organization dials only the countries of its phone numbers, US "
        "(an OWNER or ADMIN may change that: PATCH /v1/organization/dial-policy, "
        'e.g. {"allowedCountries": ["JM", "US"]})'
    )
    assert (policy.refusal(DOMINICAN_REPUBLIC) or "").startswith(f"{DOMINICAN_REPUBLIC} is in Dominican Republic;")
    assert (policy.refusal(UK_MOBILE) or "").startswith(f"{UK_MOBILE} is in United Kingdom;")
    assert at_home("GB", "US").refusal(UK_MOBILE) is None


def test_an_organization_without_a_number_dials_no_country_by_default() -> None:
    assert (DEFAULT_POLICY.refusal(US_NUMBER) or "").startswith(
        f"{US_NUMBER} is in United States; this organization has no phone number, and by default dials only the "
        "countries of its phone numbers"
    )


def test_a_country_list_replaces_the_countries_of_the_organizations_numbers() -> None:
    policy = at_home("US").model_copy(update={"allowed_countries": ("GB", "JM")})

    assert policy.refusal(JAMAICA) is None
    assert policy.refusal(UK_MOBILE) is None
    assert (policy.refusal(US_NUMBER) or "").startswith(
        f"{US_NUMBER} is in United States; this organization dials only"
    )


def test_a_number_of_no_known_country_is_dialed_only_by_an_organization_dialing_every_country_of_its_code() -> None:
    # +1 555 is in no range of the plan: the US's, or Jamaica's? Only dialing all 25 countries of +1 covers it.
    fictional = "+15555550100"
    unclassified = frozenset({NumberKind.UNCLASSIFIED})
    nanp = tuple(phonenumbers.region_codes_for_country_code(1))

    refusal = at_home("US").model_copy(update={"allowed_kinds": unclassified}).refusal(fictional)

    assert (refusal or "").startswith(f"{fictional} is in no country phonenumbers can tell (+1 is shared by AG, ")
    assert OutboundDialPolicy(allowed_kinds=unclassified, allowed_countries=nanp).refusal(fictional) is None


def test_numbers_of_no_known_type_and_international_networks_are_refused_unless_allowed() -> None:
    fictional = "+15555550100"  # a possible number (config.phone accepts it) in no assigned range
    iridium = phonenumbers.example_number_for_non_geo_entity(881)
    assert iridium is not None
    satellite = phonenumbers.format_number(iridium, phonenumbers.PhoneNumberFormat.E164)

    assert (DEFAULT_POLICY.refusal(fictional) or "").startswith(f"{fictional} is a number of no known type;")
    assert "international network" in (DEFAULT_POLICY.refusal(satellite) or "")
    nanp = tuple(phonenumbers.region_codes_for_country_code(1))  # no country known: every one of +1 (see below)
    assert (
        OutboundDialPolicy(allowed_kinds=frozenset({NumberKind.UNCLASSIFIED}), allowed_countries=nanp).refusal(
            fictional
        )
        is None
    )
    assert OutboundDialPolicy(international_networks=True).refusal(satellite) is None  # no country to dial, none needed


def test_a_country_list_dials_only_those_countries() -> None:
    policy = OutboundDialPolicy(allowed_countries=("GB",))

    assert policy.refusal(UK_MOBILE) is None
    assert (policy.refusal("+14155550123") or "").startswith("+14155550123 is in United States; this organization")


def test_international_networks_allowed_beside_a_country_list_are_dialed() -> None:
    # A network is no country: an organization that dials GB and, deliberately, satellite phones dials both.
    iridium = phonenumbers.example_number_for_non_geo_entity(881)
    assert iridium is not None
    satellite = phonenumbers.format_number(iridium, phonenumbers.PhoneNumberFormat.E164)
    policy = OutboundDialPolicy(allowed_countries=("GB",), international_networks=True)

    assert policy.refusal(satellite) is None
    assert policy.refusal(UK_MOBILE) is None
    assert "international network" in (OutboundDialPolicy(allowed_countries=("GB",)).refusal(satellite) or "")


# ------------------------------------------------------------------------------------ through the real server


@pytest.fixture(scope="module")
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio() as fake:
        fake.default = Busy()  # a call that is placed ends at once; what matters is whether it was placed
        yield fake


@pytest.fixture(scope="module")
async def engine(db_url: str, twilio: FakeTwilio) -> AsyncIterator[str]:
    async with running_engine(
        db_url,
        dispatch_enabled=False,
        twilio_auth_token=twilio.auth_token,
        twilio_account_sid=twilio.account_sid,
        twilio_api_base=twilio.api_base,
    ) as base:
        yield base


@pytest.fixture
async def api(engine: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, engine)


_caller_ids = iter(range(100, 1000))


async def dialer_tenant(pool: asyncpg.Pool, name: str) -> tuple[Tenant, str, str]:
    """An organization that can place calls, with a US number: (tenant, an OUTBOUND agent's id, its caller id)."""
    tenant = await make_tenant(pool, name, credits=500)
    number = await phone_numbers.create_phone_number(
        pool, organization_id=tenant.organization_id, phone_number=f"+14155550{next(_caller_ids):03d}"
    )
    return tenant, await make_agent(pool, tenant.organization_id), number.phone_number


async def add_uk_number(pool: asyncpg.Pool, tenant: Tenant) -> None:
    """Give the organization a UK number too: by default it then dials the UK as well."""
    await phone_numbers.create_phone_number(
        pool, organization_id=tenant.organization_id, phone_number=f"+44207946{next(_caller_ids):04d}"
    )


async def place(api: Api, tenant: Tenant, agent_id: str, caller_id: str, to: str) -> tuple[int, Any]:
    return await api.call(
        "POST", "/calls", tenant.owner_key, json={"agentId": agent_id, "fromNumber": caller_id, "to": to}
    )


async def test_the_api_refuses_a_premium_rate_number_and_dials_nothing(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant, agent_id, caller_id = await dialer_tenant(pool, "Premium")

    status, body = await place(api, tenant, agent_id, caller_id, UK_PREMIUM)

    assert (status, body["error"]["code"], body["error"]["field"]) == (422, "invalid_value", "to"), body
    assert body["error"]["message"].startswith(
        f"to: {UK_PREMIUM} is a premium-rate number; this organization does not dial premium-rate numbers"
    )
    assert twilio.creates[UK_PREMIUM] == 0
    logs = await pool.fetchval('SELECT count(*) FROM "CallLog" WHERE "organizationId" = $1', tenant.organization_id)
    assert logs == 0


async def test_the_api_places_a_call_to_a_mobile_number(api: Api, pool: asyncpg.Pool, twilio: FakeTwilio) -> None:
    tenant, agent_id, caller_id = await dialer_tenant(pool, "Mobile")
    await add_uk_number(pool, tenant)

    status, body = await place(api, tenant, agent_id, caller_id, UK_MOBILE)

    assert status == 201, body
    assert twilio.creates[UK_MOBILE] >= 1
    await finished_log(pool, body["callLogId"])


async def test_the_api_refuses_another_country_of_the_organizations_country_code_and_dials_nothing(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant, agent_id, caller_id = await dialer_tenant(pool, "Caribbean")

    status, body = await place(api, tenant, agent_id, caller_id, JAMAICA)

    assert (status, body["error"]["field"]) == (422, "to"), body
    assert body["error"]["message"] == f"to: {at_home('US').refusal(JAMAICA)}"
    assert twilio.creates[JAMAICA] == 0
    logs = await pool.fetchval('SELECT count(*) FROM "CallLog" WHERE "organizationId" = $1', tenant.organization_id)
    assert logs == 0


async def test_the_policy_shows_the_countries_of_the_organizations_numbers_as_its_default(
    api: Api, pool: asyncpg.Pool
) -> None:
    tenant, _, _ = await dialer_tenant(pool, "Shown")
    await add_uk_number(pool, tenant)
    await phone_numbers.create_phone_number(  # in no range phonenumbers knows: its code's main country, the US
        pool, organization_id=tenant.organization_id, phone_number=f"+15550188{next(_caller_ids):03d}"
    )
    numberless = await make_tenant(pool, "Numberless")

    _, policy = await api.call("GET", POLICY_PATH, tenant.viewer_key)
    _, none = await api.call("GET", POLICY_PATH, numberless.viewer_key)

    assert (policy["defaultCountries"], policy["allowedCountries"], policy["updatedAt"]) == (["GB", "US"], None, None)
    assert (none["defaultCountries"], none["allowedCountries"]) == ([], None)


async def test_a_country_list_replaces_the_default_and_null_restores_it(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    tenant, agent_id, caller_id = await dialer_tenant(pool, "Islands")

    status, policy = await api.call("PATCH", POLICY_PATH, tenant.owner_key, json={"allowedCountries": ["JM", "US"]})
    assert (status, policy["allowedCountries"], policy["defaultCountries"]) == (200, ["JM", "US"], ["US"]), policy
    placed, body = await place(api, tenant, agent_id, caller_id, JAMAICA)
    assert placed == 201, body
    await finished_log(pool, body["callLogId"])
    status, policy = await api.call("PATCH", POLICY_PATH, tenant.owner_key, json={"allowedCountries": None})
    refused, _ = await place(api, tenant, agent_id, caller_id, JAMAICA)

    assert (status, policy["allowedCountries"]) == (200, None), policy
    assert refused == 422


async def test_an_organization_that_opts_in_dials_premium_rate_and_another_still_does_not(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    opted, agent_id, caller_id = await dialer_tenant(pool, "OptedIn")
    other, other_agent, other_caller = await dialer_tenant(pool, "Careful")

    status, policy = await api.call(
        "PATCH", POLICY_PATH, opted.owner_key, json={"allowedKinds": ["premium_rate"], "allowedCountries": ["GB"]}
    )
    assert (status, policy["allowedKinds"]) == (200, ["premium_rate"]), policy
    placed, body = await place(api, opted, agent_id, caller_id, UK_PREMIUM)
    refused, _ = await place(api, other, other_agent, other_caller, UK_PREMIUM)
    _, others_policy = await api.call("GET", POLICY_PATH, other.owner_key)

    assert placed == 201, body
    await finished_log(pool, body["callLogId"])
    assert refused == 422
    assert (others_policy["allowedKinds"], others_policy["updatedAt"]) == ([], None)


async def test_a_viewer_cannot_change_the_dial_policy(api: Api, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Viewed")

    status, body = await api.call("PATCH", POLICY_PATH, tenant.viewer_key, json={"allowedKinds": ["premium_rate"]})
    _, policy = await api.call("GET", POLICY_PATH, tenant.viewer_key)

    assert status == 403, body
    assert policy["allowedKinds"] == []


async def test_a_kind_dialed_anyway_or_an_unknown_country_is_refused_by_name(api: Api, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Typo")

    kind, kind_body = await api.call("PATCH", POLICY_PATH, tenant.owner_key, json={"allowedKinds": ["mobile"]})
    country, country_body = await api.call("PATCH", POLICY_PATH, tenant.owner_key, json={"allowedCountries": ["XX"]})

    assert (kind, kind_body["error"]["field"]) == (422, "allowedKinds"), kind_body
    assert (country, country_body["error"]["field"]) == (422, "allowedCountries"), country_body


async def test_one_organizations_policy_row_is_invisible_to_another_under_row_level_security(
    api: Api, pool: asyncpg.Pool
) -> None:
    opted = await make_tenant(pool, "RowOwner")
    other = await make_tenant(pool, "RowStranger")
    await api.call("PATCH", POLICY_PATH, opted.owner_key, json={"allowedKinds": ["premium_rate"]})

    async with tenant_transaction(pool, other.organization_id) as conn:
        seen = await conn.fetchval('SELECT count(*) FROM "OutboundDialPolicy"')
        changed = await conn.execute('UPDATE "OutboundDialPolicy" SET "allowedKinds" = \'{}\'')

    assert (seen, changed) == (0, "UPDATE 0")
    row = await pool.fetchval(
        'SELECT "allowedKinds" FROM "OutboundDialPolicy" WHERE "organizationId" = $1', opted.organization_id
    )
    assert row == ["premium_rate"]


async def test_a_country_list_holding_null_is_refused_by_the_table_whoever_writes_it(pool: asyncpg.Pool) -> None:
    # Another writer (a dashboard sharing the database) meets the table's CHECK, not the API's validation: a NULL
    # country would have failed every outbound call of the organization when the engine read the policy.
    tenant = await make_tenant(pool, "NullCountry")
    for countries in (["GB", None], [None], ["gb"]):
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute(
                'INSERT INTO "OutboundDialPolicy" ("organizationId", "allowedCountries") VALUES ($1, $2)',
                tenant.organization_id,
                countries,
            )


async def test_two_changes_to_different_parts_of_the_policy_at_once_both_stand(api: Api, pool: asyncpg.Pool) -> None:
    # One OWNER narrowing the countries while another allows a kind: each PATCH reads the policy and writes it whole,
    # so neither may write back the part the other changed as it was before (the tightening silently undone).
    tenant = await make_tenant(pool, "TwoAdmins")
    await api.call("PATCH", POLICY_PATH, tenant.owner_key, json={"internationalNetworks": False})  # the row exists
    holder = await pool.acquire()
    try:
        blocker = holder.transaction()
        await blocker.start()
        await holder.execute(
            'SELECT 1 FROM "OutboundDialPolicy" WHERE "organizationId" = $1 FOR UPDATE', tenant.organization_id
        )
        narrow = asyncio.create_task(
            api.call("PATCH", POLICY_PATH, tenant.owner_key, json={"allowedCountries": ["GB"]})
        )
        widen = asyncio.create_task(
            api.call("PATCH", POLICY_PATH, tenant.owner_key, json={"allowedKinds": ["premium_rate"]})
        )
        for _ in range(500):  # until both requests wait on a lock, each having read what it could before
            waiting = await pool.fetchval(
                """SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> $1
                   AND datname = current_database() AND query ILIKE '%dial%policy%'""",
                holder.get_server_pid(),
            )
            if waiting == 2:
                break
            await asyncio.sleep(0.01)
        assert waiting == 2
        await blocker.rollback()
        results = await asyncio.gather(narrow, widen)
    finally:
        await pool.release(holder)

    assert [status for status, _ in results] == [200, 200], results
    _, policy = await api.call("GET", POLICY_PATH, tenant.viewer_key)
    assert (policy["allowedCountries"], policy["allowedKinds"]) == (["GB"], ["premium_rate"])


# ------------------------------------------------------------------------------------------------- campaigns


async def new_campaign(api: Api, tenant: Tenant, agent_id: str, caller_id: str) -> str:
    status, campaign = await api.call(
        "POST",
        "/campaigns",
        tenant.owner_key,
        json={"batchName": "Offers", "agentId": agent_id, "fromNumber": caller_id},
    )
    assert status == 201, campaign
    campaign_id: str = campaign["id"]
    return campaign_id


async def import_csv(
    api: Api, tenant: Tenant, agent_id: str, caller_id: str, csv: str
) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """Import `csv` into a new campaign of the tenant: the answer's status and body, and the ERROR recipients."""
    path = f"/campaigns/{await new_campaign(api, tenant, agent_id, caller_id)}/recipients"
    status, summary = await api.call("POST", path, tenant.owner_key, json={"csv": csv})
    _, page = await api.call("GET", f"{path}?status=ERROR", tenant.owner_key)
    return status, summary, page["data"]


async def test_a_campaign_import_keeps_a_premium_rate_row_as_an_error_naming_its_kind(
    api: Api, pool: asyncpg.Pool
) -> None:
    tenant, agent_id, caller_id = await dialer_tenant(pool, "Importer")
    await add_uk_number(pool, tenant)

    status, summary, errors = await import_csv(
        api, tenant, agent_id, caller_id, f"phone,name\n{UK_MOBILE},Ann\n{UK_PREMIUM},Bob\n"
    )

    assert status == 200 and (summary["imported"], summary["errors"]) == (1, 1), summary
    [refused] = errors
    assert (refused["phoneNumber"], refused["state"], refused["error"]["at"]) == (UK_PREMIUM, "error", "line 3")
    assert refused["error"]["reason"].startswith(
        f"{UK_PREMIUM} is a premium-rate number; this organization does not dial premium-rate numbers"
    )


async def test_a_campaign_import_keeps_a_row_of_another_country_of_the_same_code_as_an_error(
    api: Api, pool: asyncpg.Pool
) -> None:
    tenant, agent_id, caller_id = await dialer_tenant(pool, "Caribbean importer")

    status, summary, errors = await import_csv(
        api, tenant, agent_id, caller_id, f"phone\n{US_NUMBER}\n{JAMAICA}\n{DOMINICAN_REPUBLIC}\n"
    )

    assert status == 200 and (summary["imported"], summary["errors"]) == (1, 2), summary
    reasons = {row["phoneNumber"]: row["error"]["reason"] for row in errors}
    assert reasons == {number: at_home("US").refusal(number) for number in (JAMAICA, DOMINICAN_REPUBLIC)}


@pytest.fixture(scope="module")
async def deps(db_url: str, pool: asyncpg.Pool, twilio: FakeTwilio, engine: str) -> AsyncIterator[OutboundDeps]:
    """What the test's own dispatcher dials with (the engine's is off), Twilio calling back on the engine."""
    settings = load_settings(
        database_url=db_url,
        twilio_auth_token=twilio.auth_token,
        twilio_account_sid=twilio.account_sid,
        twilio_api_base=twilio.api_base,
    )
    client = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base=twilio.api_base)
    try:
        yield OutboundDeps(pool=pool, settings=settings, twilio=client, public_url=engine)
    finally:
        await client.close()


async def test_a_recipient_imported_while_allowed_is_not_dialed_once_the_policy_tightens(
    api: Api, pool: asyncpg.Pool, twilio: FakeTwilio, deps: OutboundDeps
) -> None:
    tenant, agent_id, caller_id = await dialer_tenant(pool, "Tightened")
    premium = example("GB", PhoneNumberType.PREMIUM_RATE)[:-1] + "9"  # a number no other test dials
    await api.call(
        "PATCH", POLICY_PATH, tenant.owner_key, json={"allowedKinds": ["premium_rate"], "allowedCountries": ["GB"]}
    )
    campaign_id = await new_campaign(api, tenant, agent_id, caller_id)
    path = f"/campaigns/{campaign_id}/recipients"
    _, summary = await api.call("POST", path, tenant.owner_key, json={"recipients": [{"phoneNumber": premium}]})
    assert summary["imported"] == 1, summary
    status, body = await api.call("POST", f"/campaigns/{campaign_id}/start", tenant.owner_key)
    assert status == 200, body

    status, _ = await api.call("PATCH", POLICY_PATH, tenant.owner_key, json={"allowedKinds": []})
    assert status == 200
    dispatcher = CampaignDispatcher(
        pool, PlaceCallDialer(deps), timing=DispatchTiming(interval=timedelta(0), idle_recheck=timedelta(0))
    )
    for _ in range(20):  # the first tick starts the campaign, a later one claims and dials
        await dispatcher.tick()
        await dispatcher.drain()
        _, campaign = await api.call("GET", f"/campaigns/{campaign_id}", tenant.owner_key)
        if campaign["status"] == "COMPLETED":
            break

    _, page = await api.call("GET", path, tenant.owner_key)
    [recipient] = page["data"]
    assert campaign["status"] == "COMPLETED", campaign
    assert (recipient["state"], recipient["attempts"], recipient["lastCallLogId"]) == ("failed", 0, None)
    assert recipient["lastReason"].startswith(f"not dialed: to: {premium} is a premium-rate number;")
    assert twilio.creates[premium] == 0
