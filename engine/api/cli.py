"""`dialtone api-key create`: mint an API key for a member of an organization, printing the key this once."""

from __future__ import annotations

import argparse
from datetime import datetime

from config.settings import Settings
from storage import api_keys, organizations, users
from storage.enums import UserStatus
from storage.migrate import migrate
from storage.organizations import Organization
from storage.pool import database
from storage.records import Queryable
from storage.users import User


def add_api_key_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `api-key create` to the `dialtone` command's subcommands."""
    keys = commands.add_parser("api-key", help="API keys for the /v1 API")
    actions = keys.add_subparsers(dest="api_key_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key and print it (it is stored only as a hash)")
    create.add_argument("--org", required=True, help="the organization: its id or slug")
    create.add_argument("--user", required=True, help="the key's user, a member of the organization: id or email")
    create.add_argument("--name", default="CLI key", help="what the key is for (default: 'CLI key')")
    create.add_argument("--test", action="store_true", help="an sk_test_ key rather than sk_live_")
    create.add_argument(
        "--expires", type=datetime.fromisoformat, help="when the key stops working, ISO 8601 with offset"
    )


async def run_api_key_command(args: argparse.Namespace, settings: Settings) -> None:
    """Create the key; ValueError (printed by the CLI) naming what is missing or wrong."""
    if args.expires is not None and args.expires.tzinfo is None:
        raise ValueError("--expires needs a UTC offset, e.g. 2027-01-01T00:00:00+00:00")
    async with database(settings) as db:
        async with db.pool.acquire() as conn:
            await migrate(conn)
        organization = await _organization(db.pool, args.org)
        user = await _user(db.pool, args.user)
        if await users.find_membership(db.pool, organization_id=organization.id, user_id=user.id) is None:
            raise ValueError(f"{user.email} is not a member of {organization.slug}; a key of theirs would not work")
        if user.status is not UserStatus.ACTIVE:
            raise ValueError(f"{user.email} is {user.status.value}, not ACTIVE; a key of theirs would not work")
        created = await api_keys.create_api_key(
            db.pool,
            organization_id=organization.id,
            user_id=user.id,
            name=args.name,
            live=not args.test,
            expiration_date=args.expires,
        )
    print(f"API key for {organization.slug} ({user.email}), shown this once; store it now:")
    print(created.plaintext)


async def _organization(db: Queryable, reference: str) -> Organization:
    found = await organizations.get_organization_by_slug(db, slug=reference)
    if found is not None:
        return found
    return await organizations.get_organization(db, organization_id=reference)


async def _user(db: Queryable, reference: str) -> User:
    found = await users.get_user_by_email(db, email=reference) if "@" in reference else None
    if found is not None:
        return found
    return await users.get_user(db, user_id=reference)
