"""`dialtone dnc ...` as an operator runs it: real processes on a real database, one-line errors."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from storage import do_not_call
from tests.test_campaign_cli import dialtone
from tests.test_repo_agents import insert_organization


async def test_add_list_import_and_remove(pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    org = await insert_organization(pool)
    slug = await pool.fetchval('SELECT "slug" FROM "Organization" WHERE "id" = $1', org)

    code, out, err = await dialtone(
        db_url, tmp_path, "dnc", "add", "--org", slug, "+1 415 555 0171", "--reason", "rude"
    )
    assert code == 0, err
    assert out.startswith("+14155550171 added")
    code, out, err = await dialtone(db_url, tmp_path, "dnc", "add", "--org", org, "+14155550171")
    assert code == 0 and "was already listed" in out, err

    csv = tmp_path / "quiet.csv"
    csv.write_text("phoneNumber,reason\n+14155550172,moved\nnot a number,\n+14155550171,\n", encoding="utf-8")
    code, out, err = await dialtone(db_url, tmp_path, "dnc", "import", "--org", org, str(csv))
    assert code == 0, err
    assert "line 3: 'not a number'" in out
    assert "3 rows: 1 added, 1 already listed, 0 duplicates, 1 invalid" in out

    code, out, err = await dialtone(db_url, tmp_path, "dnc", "list", "--org", org)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["+14155550172", "CSV_IMPORT"], ["+14155550171", "CLI"]]
    assert lines[1].split("\t")[3] == "rude"

    code, out, err = await dialtone(db_url, tmp_path, "dnc", "remove", "--org", org, "+14155550171")
    assert code == 0, err
    assert await do_not_call.listed_entry(pool, organization_id=org, phone_number="+14155550171") is None
    assert await do_not_call.listed_entry(pool, organization_id=org, phone_number="+14155550172") is not None


async def test_bad_input_is_a_one_line_error(pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    org = await insert_organization(pool)
    code, _, err = await dialtone(db_url, tmp_path, "dnc", "add", "--org", org, "call me maybe")
    assert code == 1 and err.strip().startswith("dialtone: 'call me maybe' is not a valid phone number"), err
    code, _, err = await dialtone(db_url, tmp_path, "dnc", "remove", "--org", org, "+14155550179")
    assert code == 1 and "not found" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = await dialtone(db_url, tmp_path, "dnc", "import", "--org", org, str(tmp_path / "missing.csv"))
    assert code == 1 and "missing.csv" in err, err
    assert await do_not_call.list_entries(pool, organization_id=org, limit=10) == []


async def test_an_import_whose_reasons_hold_nul_bytes_lists_every_number(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    org = await insert_organization(pool)
    csv = tmp_path / "nul.csv"
    csv.write_bytes(b"phoneNumber,reason\n+14155550181,moved\x00away\n+14155550182,asked\x00\n")
    code, out, err = await dialtone(db_url, tmp_path, "dnc", "import", "--org", org, str(csv))
    assert code == 0, err
    assert "2 rows: 2 added" in out
    entries = await do_not_call.list_entries(pool, organization_id=org, limit=10)
    assert sorted((e.phone_number, e.reason) for e in entries) == [
        ("+14155550181", "moved away"),
        ("+14155550182", "asked"),
    ]
