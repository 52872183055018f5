"""`dialtone dnc ...`: add, remove, list and import numbers on an organization's do-not-call list."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from config.phone import e164
from config.settings import Settings
from engine.campaigns.cli import organization_id_of, region_option
from engine.campaigns.recipients_csv import not_utf8
from engine.do_not_call.csv_import import read_do_not_call
from storage import Pool, do_not_call
from storage.do_not_call import DoNotCallSource
from storage.pool import database

_LIST_PAGE = 100


def add_dnc_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `dnc` and its actions on the `dialtone` parser."""
    dnc = commands.add_parser("dnc", help="the do-not-call list: add, remove, list, import")
    actions = dnc.add_subparsers(dest="dnc_command", required=True, metavar="ACTION")

    add = actions.add_parser("add", help="list a number: no campaign or call will dial it")
    _organization(add)
    add.add_argument("number", help="the number, in international form (+14155550100)")
    add.add_argument("--reason", help="why (shown with the entry and on skipped campaign recipients)")

    remove = actions.add_parser("remove", help="take a number off the list")
    _organization(remove)
    remove.add_argument("number")

    show = actions.add_parser("list", help="print the list, newest first")
    _organization(show)
    show.add_argument("--number", help="only this number's entry")

    load = actions.add_parser("import", help="list the numbers of a CSV file (phoneNumber column, or the first)")
    _organization(load)
    load.add_argument("file", type=Path)
    load.add_argument("--reason", help="for rows without a reason column of their own")
    load.add_argument("--region", help="country for numbers written without +<country>, e.g. US")


def _organization(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--org", required=True, help="the organization's id or slug")


async def run_dnc_command(args: argparse.Namespace, settings: Settings) -> None:
    """Run one `dnc` action; StorageError and ValueError (an invalid number) reach the caller as one-line messages."""
    async with database(settings) as db:
        pool = db.pool
        organization_id = await organization_id_of(pool, args.org)
        match args.dnc_command:
            case "add":
                entry, added = await do_not_call.add_entry(
                    pool,
                    organization_id=organization_id,
                    phone_number=args.number,
                    source=DoNotCallSource.CLI,
                    reason=args.reason,
                )
                print(f"{entry.phone_number} {'added' if added else 'was already listed'} ({entry.id})")
            case "remove":
                await do_not_call.remove_number(pool, organization_id=organization_id, phone_number=args.number)
                print(f"{args.number} removed")
            case "list":
                await _print_list(pool, organization_id, args.number)
            case "import":
                await _import(pool, organization_id, args.file, reason=args.reason, region=args.region)
            case _:
                raise AssertionError(f"unhandled dnc action {args.dnc_command}")


async def _print_list(pool: Pool, organization_id: str, number: str | None) -> None:
    wanted = e164(number) if number else None
    before = None
    while True:
        page = await do_not_call.list_entries(
            pool, organization_id=organization_id, limit=_LIST_PAGE, before=before, phone_number=wanted
        )
        for entry in page:
            when = entry.created_at.strftime("%Y-%m-%d %H:%M")
            call = f"  call {entry.call_log_id}" if entry.call_log_id else ""
            print(f"{entry.phone_number}\t{entry.source}\t{when}\t{entry.reason or ''}{call}")
        if len(page) < _LIST_PAGE:
            return
        before = (page[-1].created_at, page[-1].id)


async def _import(pool: Pool, organization_id: str, path: Path, *, reason: str | None, region: str | None) -> None:
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except UnicodeDecodeError:
        raise await asyncio.to_thread(not_utf8, path) from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    parsed = read_do_not_call(text, default_region=region_option(region), reason=reason)
    added = await do_not_call.add_entries(
        pool, organization_id=organization_id, numbers=parsed.numbers, source=DoNotCallSource.CSV_IMPORT
    )
    for problem in parsed.problems:
        print(f"line {problem.line}: {problem.value!r}: {problem.reason}")
    print(
        f"{parsed.rows:,} rows: {added:,} added, {len(parsed.numbers) - added:,} already listed, "
        f"{parsed.duplicates:,} duplicates, {parsed.invalid:,} invalid"
    )
