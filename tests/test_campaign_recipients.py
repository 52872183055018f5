"""Recipients from CSV: dialects, BOM, quotes, header aliases, E.164 checks, ERROR rows kept, duplicates merged."""

from __future__ import annotations

import io
from pathlib import Path

import asyncpg
import pytest

from engine.campaigns.recipients_csv import RecipientsFileError, open_recipients_file, read_recipients
from storage import campaigns
from storage.agents import create_agent
from storage.campaigns import Campaign
from storage.enums import CampaignStatus, RecipientStatus
from storage.errors import ConstraintViolation
from storage.records import Queryable
from tests.test_dial_policy import at_home
from tests.test_repo_agents import insert_organization

US_AND_GERMANY = at_home("DE", "US")
"""The policy of an organization with numbers in the US and Germany, the countries these files' numbers are in."""


def parse(text: str, region: str | None = None) -> list[campaigns.NewRecipient]:
    return [row.recipient for row in read_recipients(io.StringIO(text), default_region=region, policy=US_AND_GERMANY)]


async def new_campaign(db: Queryable) -> Campaign:
    org = await insert_organization(db)
    agent = await create_agent(db, organization_id=org, name="Caller")
    return await campaigns.create_campaign(db, organization_id=org, batch_name="Spring", agent_id=agent.id)


async def dispatch_rows(pool: asyncpg.Pool, campaign_id: str) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch(
        """
        SELECT r."phoneNumber", r."name", r."notes", r."status", d."state", d."lastReason", d."variables",
               d."timezone"
        FROM "CampaignRecipient" r JOIN "CampaignRecipientDispatch" d ON d."recipientId" = r."id"
        WHERE r."campaignId" = $1
        """,
        campaign_id,
    )
    return {row["phoneNumber"]: row for row in rows}


def test_a_utf8_bom_does_not_hide_the_first_header(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffphone,name\n+12125551234,Ada\n".encode())
    with open_recipients_file(path) as stream:
        [row] = list(read_recipients(stream, policy=US_AND_GERMANY))
    assert (row.recipient.phone_number, row.recipient.name) == ("+12125551234", "Ada")


def test_semicolons_and_quoted_fields_are_read_as_written() -> None:
    text = 'Phone Number;Name;Notes\n"+1 (212) 555-1234";"Lovelace; Ada";"said ""call after 5"""\n'
    [recipient] = parse(text)
    assert recipient.phone_number == "+12125551234"
    assert recipient.name == "Lovelace; Ada"
    assert recipient.notes == 'said "call after 5"'


def test_tabs_are_a_delimiter_too() -> None:
    [recipient] = parse("phoneNumber\tname\n+14155550123\tGrace\n")
    assert (recipient.phone_number, recipient.name) == ("+14155550123", "Grace")


@pytest.mark.parametrize("header", ["phone", "phone_number", "phoneNumber", "Phone Number", "mobile"])
def test_the_phone_column_goes_by_several_names(header: str) -> None:
    [recipient] = parse(f"{header},name\n+12125551234,Ada\n")
    assert recipient.phone_number == "+12125551234"


def test_extra_columns_become_variables_by_header_name() -> None:
    [recipient] = parse("phone,name,Plan Tier,renewal-date,empty\n+12125551234,Ada,gold,2026-12-01,\n")
    assert recipient.variables == {"Plan_Tier": "gold", "renewal_date": "2026-12-01"}


def test_a_national_number_is_completed_with_the_default_region() -> None:
    [recipient] = parse("phone\n030 1234567\n", region="DE")
    assert recipient.phone_number == "+49301234567"
    assert recipient.timezone == "Europe/Berlin"


def test_invalid_rows_are_kept_as_errors_with_the_reason() -> None:
    recipients = parse("phone,name\n12345,No country\n+1 212 555,Too short\n,Blank\nbanana,Fruit\n")
    assert [r.status for r in recipients] == [RecipientStatus.ERROR] * 4
    reasons = [r.error_reason or "" for r in recipients]
    assert reasons[0].startswith("line 2: ") and "no country code" in reasons[0]
    assert "'+1 212 555'" in reasons[1]
    assert reasons[2] == "line 4: no phone number"
    assert "'banana'" in reasons[3]
    assert [r.name for r in recipients] == ["No country", "Too short", "Blank", "Fruit"]


def test_blank_lines_are_skipped_and_line_numbers_kept() -> None:
    rows = list(read_recipients(io.StringIO("phone\n+12125551234\n\n+12125551235\n"), policy=US_AND_GERMANY))
    assert [row.line for row in rows] == [2, 4]


def test_a_file_without_a_phone_column_is_refused_naming_its_header() -> None:
    with pytest.raises(RecipientsFileError, match="'email', 'name'"):
        parse("email,name\na@example.com,Ada\n")
    with pytest.raises(RecipientsFileError, match="empty"):
        parse("")


def test_a_row_split_across_the_sniffed_sample_is_read_whole() -> None:
    filler = "x" * 200
    lines = "".join(f"+1212555{n:04d},{filler}\n" for n in range(400))  # ~80 kB: past the 64 kB sample
    recipients = parse("phone,extra\n" + lines)
    assert len(recipients) == 400
    assert all(r.status == RecipientStatus.READY and r.variables == {"extra": filler} for r in recipients)


def test_a_row_whose_quoted_notes_span_lines_is_named_by_the_line_it_starts_on() -> None:
    text = 'phone,notes\n12,"called twice;\nno answer"\n\n+12125550101,"a\nb\nc"\n'
    bad, good = read_recipients(io.StringIO(text), policy=US_AND_GERMANY)
    assert (bad.line, good.line) == (2, 5)
    assert bad.recipient.error_reason is not None and bad.recipient.error_reason.startswith("line 2: ")
    assert (good.recipient.status, good.recipient.notes) == (RecipientStatus.READY, "a\nb\nc")


def test_a_field_past_the_csv_modules_limit_is_refused_naming_its_line() -> None:
    with pytest.raises(RecipientsFileError, match=r"^line 3: not readable as CSV \(field larger than field limit"):
        parse(f"phone,plan\n+12125550187,gold\n+12125550188,{'z' * 140_000}\n+12125550189,gold\n")


async def test_duplicates_are_merged_into_one_recipient(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    text = (
        "phone,name,notes,city,plan\n"
        "+12125551234,,first note,Paris,\n"
        "(212) 555-1234,Ada,second note,London,gold\n"
        "+12125559999,Grace,,,\n"
        "not a number,Bad,,,\n"
    )
    summary = await campaigns.import_recipients(
        pool, organization_id=campaign.organization_id, campaign_id=campaign.id, recipients=parse(text, "US")
    )
    assert (summary.rows, summary.imported, summary.merged, summary.errors) == (4, 2, 1, 1)
    rows = await dispatch_rows(pool, campaign.id)
    merged = rows["+12125551234"]
    assert (merged["name"], merged["notes"]) == ("Ada", "first note")
    assert merged["variables"] == {"city": "Paris", "plan": "gold"}  # the first row wins a key both have
    assert merged["timezone"] == "America/New_York"
    assert (merged["status"], merged["state"]) == ("READY", "QUEUED")
    bad = rows["not a number"]
    assert (bad["status"], bad["state"]) == ("ERROR", "INVALID")
    assert "not a phone number" in bad["lastReason"]
    stored = await campaigns.get_campaign(pool, organization_id=campaign.organization_id, campaign_id=campaign.id)
    assert stored.total_calls == 2


async def test_a_second_import_does_not_add_numbers_the_campaign_has(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    org = campaign.organization_id
    await campaigns.import_recipients(
        pool, organization_id=org, campaign_id=campaign.id, recipients=parse("phone\n+12125551234\n")
    )
    summary = await campaigns.import_recipients(
        pool, organization_id=org, campaign_id=campaign.id, recipients=parse("phone\n+12125551234\n+12125551235\n")
    )
    assert (summary.imported, summary.merged) == (1, 1)
    assert (await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign.id)).total_calls == 2


async def test_a_finished_campaign_takes_no_more_recipients(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    org = campaign.organization_id
    await campaigns.transition_campaign(
        pool, organization_id=org, campaign_id=campaign.id, status=CampaignStatus.STOPPED
    )
    with pytest.raises(ConstraintViolation, match="STOPPED"):
        await campaigns.import_recipients(
            pool, organization_id=org, campaign_id=campaign.id, recipients=parse("phone\n+12125551234\n")
        )
    assert await campaigns.list_recipients(pool, organization_id=org, campaign_id=campaign.id) == []


async def test_a_hundred_thousand_csv_rows_import_with_copy(pool: asyncpg.Pool, tmp_path: Path) -> None:
    campaign = await new_campaign(pool)
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8") as out:
        out.write("phone;name;segment\n")
        for n in range(100_000):
            out.write(f"+1212{2000000 + n};Person {n};s{n % 7}\n")
        out.write("+12122000000;Duplicate;s0\nnope;Broken;s1\n")
    with open_recipients_file(path) as stream:
        summary = await campaigns.import_recipients(
            pool,
            organization_id=campaign.organization_id,
            campaign_id=campaign.id,
            recipients=(row.recipient for row in read_recipients(stream, policy=US_AND_GERMANY)),
        )
    assert (summary.rows, summary.imported, summary.merged, summary.errors) == (100_002, 100_000, 1, 1)
    queued = await pool.fetchval(
        'SELECT count(*) FROM "CampaignRecipientDispatch" WHERE "campaignId" = $1 AND "state" = \'QUEUED\'',
        campaign.id,
    )
    assert queued == 100_000


async def test_two_imports_in_one_transaction_both_land(pool: asyncpg.Pool) -> None:
    campaign = await new_campaign(pool)
    org = campaign.organization_id
    async with pool.acquire() as conn, conn.transaction():
        for text in ("phone\n+12125551234\n", "phone\n+12125551235\n"):
            await campaigns.import_recipients(
                conn, organization_id=org, campaign_id=campaign.id, recipients=parse(text)
            )
    assert (await campaigns.get_campaign(pool, organization_id=org, campaign_id=campaign.id)).total_calls == 2
