"""The migrated database holds what the platform's data model (the seed document) asks for.

Expectations are written out here from the seed, independently of storage/schema.prisma, and checked against the
live catalog of a freshly migrated database.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

import asyncpg
import pytest

import storage.enums
from tests.catalog import Catalog, ForeignKey, Index, read_catalog

# Every field the seed lists, per table. The seed names the agent join tables without fields: their columns are
# the two ids they join.
SEED_FIELDS: dict[str, tuple[str, ...]] = {
    "Organization": ("id", "name", "slug", "plan", "credits", "createdAt", "updatedAt"),
    "User": (
        "id",
        "email",
        "firstName",
        "lastName",
        "phone",
        "timeZone",
        "password",
        "avatar",
        "role",
        "status",
        "twoFactorEnabled",
        "twoFactorSecret",
    ),
    "UserOrganization": ("userId", "organizationId", "role"),
    "Agent": (
        "id",
        "organizationId",
        "name",
        "description",
        "type",
        "status",
        "callerType",
        "phoneNumberId",
        "voiceId",
        "successRate",
        "totalCalls",
        "configuration",
    ),
    "Campaign": (
        "id",
        "organizationId",
        "batchName",
        "status",
        "progress",
        "totalCalls",
        "completedCalls",
        "agentId",
        "conversationPathId",
        "firstSentence",
        "taskPrompt",
        "postCallSummary",
        "startDate",
        "startTime",
        "callStartTime",
        "callEndTime",
    ),
    "CampaignRecipient": ("id", "campaignId", "name", "phoneNumber", "notes", "status"),
    "CallLog": (
        "id",
        "organizationId",
        "callType",
        "agentId",
        "campaignId",
        "callId",
        "customer",
        "phoneNumber",
        "timestamp",
        "duration",
        "status",
        "transcript",
        "recordingUrl",
        "metadata",
    ),
    "KnowledgeBase": (
        "id",
        "organizationId",
        "name",
        "description",
        "fileCount",
        "websiteCount",
        "textCount",
        "status",
    ),
    "KnowledgeBaseDocument": (
        "id",
        "knowledgeBaseId",
        "name",
        "type",
        "url",
        "content",
        "fileSize",
        "mimeType",
        "status",
    ),
    "Voice": (
        "id",
        "organizationId",
        "name",
        "gender",
        "description",
        "avatar",
        "tags",
        "isCustom",
        "status",
        "audioUrl",
    ),
    "ConversationPath": ("id", "organizationId", "name", "useCase", "agentSpeech", "nodes", "edges"),
    "Tool": (
        "id",
        "organizationId",
        "name",
        "description",
        "category",
        "logo",
        "iconBgColor",
        "isConnected",
        "configuration",
    ),
    "Event": ("id", "organizationId", "name", "description", "isEnabled", "agentId", "webhookUrl", "triggerCount"),
    "PhoneNumber": ("id", "organizationId", "label", "phoneNumber", "inboundStatus", "outboundStatus"),
    "ApiKey": ("id", "organizationId", "userId", "name", "key", "expirationDate", "status"),
    "AgentKnowledgeBase": ("agentId", "organizationId", "knowledgeBaseId"),
    "AgentTool": ("agentId", "organizationId", "toolId"),
    "AgentConversationPath": ("agentId", "organizationId", "conversationPathId"),
}
JOIN_TABLES = ("AgentKnowledgeBase", "AgentTool", "AgentConversationPath")
TENANT_TABLES = tuple(table for table in SEED_FIELDS if table not in ("Organization", "User"))

# The values the seed gives each enum-valued field, in its order.
SEED_ENUM_VALUES: dict[tuple[str, str], tuple[str, ...]] = {
    ("Organization", "plan"): ("free", "pro", "enterprise"),
    ("User", "role"): ("OWNER", "ADMIN", "VIEWER"),
    ("User", "status"): ("ACTIVE", "PENDING"),
    ("UserOrganization", "role"): ("OWNER", "ADMIN", "VIEWER"),
    ("Agent", "status"): ("ACTIVE", "INACTIVE"),
    ("Agent", "callerType"): ("INBOUND", "OUTBOUND"),
    ("Campaign", "status"): ("DRAFT", "PLANNED", "CONTINUING", "COMPLETED", "STOPPED"),
    ("CampaignRecipient", "status"): ("READY", "ERROR"),
    ("CallLog", "callType"): ("INBOUND", "OUTBOUND"),
    ("CallLog", "status"): ("COMPLETED", "FAILED", "MISSED", "IN_PROGRESS"),
    ("KnowledgeBase", "status"): ("PROCESSING", "READY", "ACTIVE", "EMPTY"),
    ("KnowledgeBaseDocument", "type"): ("FILE", "WEBSITE", "TEXT"),
    ("KnowledgeBaseDocument", "status"): ("PROCESSING", "READY", "ERROR"),
    ("Voice", "status"): ("READY", "PROCESSING", "ERROR"),
    ("PhoneNumber", "inboundStatus"): ("ENABLED", "DISABLED"),
    ("PhoneNumber", "outboundStatus"): ("ENABLED", "DISABLED"),
    ("ApiKey", "status"): ("ACTIVE", "REVOKED"),
}

PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    **{table: ("id",) for table in SEED_FIELDS if "id" in SEED_FIELDS[table]},
    "UserOrganization": ("userId", "organizationId"),
    "AgentKnowledgeBase": ("agentId", "organizationId", "knowledgeBaseId"),
    "AgentTool": ("agentId", "organizationId", "toolId"),
    "AgentConversationPath": ("agentId", "organizationId", "conversationPathId"),
}


@pytest.fixture(scope="module")
async def catalog(pool: asyncpg.Pool) -> Catalog:
    """The catalog of this module's freshly migrated database."""
    return await read_catalog(pool)


def has_index_leading_with(indexes: Iterable[Index], table: str, leading: tuple[str, ...]) -> bool:
    """Whether some full (not partial) index of `table` starts with these columns ("name DESC" for descending)."""
    return any(i.table == table and not i.partial and i.sorted_columns[: len(leading)] == leading for i in indexes)


def test_every_table_of_the_seed_has_every_field_it_lists(catalog: Catalog) -> None:
    columns = catalog.tables
    missing_tables = [table for table in SEED_FIELDS if table not in columns]
    missing_fields = [
        f"{table}.{field}"
        for table, fields in SEED_FIELDS.items()
        for field in fields
        if table in columns and field not in columns[table]
    ]
    assert missing_tables == [], f"tables missing: {', '.join(missing_tables)}"
    assert missing_fields == [], f"fields missing: {', '.join(missing_fields)}"


def test_every_enum_field_takes_exactly_the_values_the_seed_lists(catalog: Catalog) -> None:
    actual = {
        (table, name): catalog.enums[column.type]
        for table, columns in catalog.tables.items()
        for name, column in columns.items()
        if column.type in catalog.enums
    }
    wrong = [
        f"{table}.{column}: {', '.join(actual[table, column]) if (table, column) in actual else 'not an enum'}"
        f" instead of {', '.join(values)}"
        for (table, column), values in SEED_ENUM_VALUES.items()
        if actual.get((table, column)) != values
    ]
    assert wrong == [], "enum fields whose values differ from the seed:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    ("table", "column"),
    [
        ("User", "email"),
        ("Organization", "slug"),
        ("CallLog", "callId"),
        ("PhoneNumber", "phoneNumber"),
        ("ApiKey", "key"),
    ],
)
def test_unique_fields_have_a_unique_index_on_them_alone(catalog: Catalog, table: str, column: str) -> None:
    unique = [
        i.name
        for i in catalog.indexes
        if i.table == table and i.unique and not i.partial and i.sorted_columns == (column,)
    ]
    assert unique, f'no unique index on "{table}"("{column}") alone'


def test_every_foreign_key_is_served_by_an_index(catalog: Catalog) -> None:
    """Some index leads with exactly the foreign key's columns (in any order), so finding a parent's children
    (joins, ON DELETE, ON UPDATE) never scans the table.
    """

    def served(key: ForeignKey) -> bool:
        wanted = set(key.columns)
        return any(
            set(index.columns[: len(wanted)]) == wanted
            for index in catalog.indexes
            if index.table == key.table and not index.partial
        )

    unserved = [f"{k.name}: {k.table}({', '.join(k.columns)})" for k in catalog.foreign_keys if not served(k)]
    assert catalog.foreign_keys, "the database has no foreign keys at all"
    assert unserved == [], "foreign keys without an index leading with their columns:\n" + "\n".join(unserved)


def test_every_tenant_table_has_organization_id_not_null_except_voice(catalog: Catalog) -> None:
    columns = catalog.tables
    missing = [table for table in TENANT_TABLES if "organizationId" not in columns.get(table, {})]
    assert missing == [], f"tenant tables without organizationId: {', '.join(missing)}"
    nullable = [table for table in TENANT_TABLES if not columns[table]["organizationId"].not_null]
    assert nullable == ["Voice"], f"organizationId is nullable in {nullable}; only Voice (system voices) may be"


def test_every_tenant_table_references_its_organization(catalog: Catalog) -> None:
    referencing = {
        k.table
        for k in catalog.foreign_keys
        if k.columns == ("organizationId",) and (k.referenced_table, k.referenced_columns) == ("Organization", ("id",))
    }
    missing = [table for table in TENANT_TABLES if table not in referencing]
    assert missing == [], f'tables whose organizationId does not reference "Organization"("id"): {", ".join(missing)}'


def test_call_log_is_indexed_on_each_column_the_seed_filters_by(catalog: Catalog) -> None:
    filters = ("organizationId", "agentId", "campaignId", "callId", "status", "callType", "timestamp", "phoneNumber")
    unindexed = [column for column in filters if not has_index_leading_with(catalog.indexes, "CallLog", (column,))]
    assert unindexed == [], f"CallLog columns no index leads with: {', '.join(unindexed)}"


@pytest.mark.parametrize(
    ("table", "leading"),
    [
        ("CallLog", ("organizationId", "timestamp DESC")),
        ("Campaign", ("organizationId", "status")),
        ("Agent", ("organizationId", "status", "callerType")),
    ],
)
def test_the_seeds_composite_indexes_exist(catalog: Catalog, table: str, leading: tuple[str, ...]) -> None:
    on_table = [f"{i.name}({', '.join(i.sorted_columns)})" for i in catalog.indexes if i.table == table]
    assert has_index_leading_with(catalog.indexes, table, leading), (
        f"no index on {table}({', '.join(leading)}); the table has: {'; '.join(on_table)}"
    )


def test_deleting_an_organization_deletes_every_row_that_references_it(catalog: Catalog) -> None:
    to_organization = [k for k in catalog.foreign_keys if k.referenced_table == "Organization"]
    not_cascading = [f"{k.name} (ON DELETE {k.on_delete})" for k in to_organization if k.on_delete != "CASCADE"]
    assert to_organization, "no foreign key references Organization"
    assert not_cascading == [], "foreign keys to Organization that do not cascade: " + ", ".join(not_cascading)


@pytest.mark.parametrize(
    ("table", "parent"),
    [
        ("UserOrganization", "User"),
        ("ApiKey", "User"),
        ("CampaignRecipient", "Campaign"),
        ("KnowledgeBaseDocument", "KnowledgeBase"),
    ],
)
def test_deleting_a_parent_deletes_its_owned_rows(catalog: Catalog, table: str, parent: str) -> None:
    keys = [k for k in catalog.foreign_keys if k.table == table and k.referenced_table == parent]
    assert keys, f"{table} has no foreign key to {parent}"
    assert all(k.on_delete == "CASCADE" for k in keys), f"{table} → {parent}: {[(k.name, k.on_delete) for k in keys]}"


def test_every_table_has_a_text_primary_key(catalog: Catalog) -> None:
    actual = {i.table: i.sorted_columns for i in catalog.indexes if i.primary}
    wrong = [f"{t}: {actual.get(t)} instead of {key}" for t, key in PRIMARY_KEYS.items() if actual.get(t) != key]
    assert wrong == [], "primary keys differ:\n" + "\n".join(wrong)
    columns = catalog.tables
    not_text = [
        f"{t}.{c} is {columns[t][c].type}"
        for t, key in PRIMARY_KEYS.items()
        for c in key
        if columns[t][c].type != "text"
    ]
    assert not_text == [], "primary key columns that are not text: " + ", ".join(not_text)


def test_every_table_records_when_its_rows_were_created_and_updated(catalog: Catalog) -> None:
    columns = catalog.tables
    expected = {t: ("createdAt",) if t in JOIN_TABLES else ("createdAt", "updatedAt") for t in SEED_FIELDS}
    wrong = [
        f"{table}.{column}: {'missing' if column not in columns[table] else 'nullable'}"
        for table, stamps in expected.items()
        for column in stamps
        if column not in columns[table] or not columns[table][column].not_null
    ]
    assert wrong == [], "timestamps missing or nullable: " + ", ".join(wrong)


async def test_an_update_advances_updated_at(pool: asyncpg.Pool) -> None:
    inserted = await pool.fetchrow(
        """
        INSERT INTO "Organization" ("id", "name", "slug", "createdAt", "updatedAt")
        VALUES ('org_touch', 'Acme', 'acme-touch', now() - interval '1 hour', now() - interval '1 hour')
        RETURNING "createdAt", "updatedAt"
        """
    )
    updated = await pool.fetchrow(
        """
        UPDATE "Organization" SET "name" = 'Acme Corp' WHERE "id" = 'org_touch'
        RETURNING "createdAt", "updatedAt"
        """
    )
    assert inserted is not None and updated is not None
    assert updated["updatedAt"] > inserted["updatedAt"], "updating the name left updatedAt where it was"
    assert updated["createdAt"] == inserted["createdAt"], "updating the name changed createdAt"


async def test_every_table_with_updated_at_keeps_it_current_on_update(pool: asyncpg.Pool) -> None:
    rows = await pool.fetch(
        """
        SELECT c.table_name,
               EXISTS (SELECT 1 FROM information_schema.triggers t
                       WHERE t.event_object_schema = c.table_schema AND t.event_object_table = c.table_name
                         AND t.event_manipulation = 'UPDATE' AND t.action_timing = 'BEFORE'
                         AND t.action_statement = 'EXECUTE FUNCTION dialtone_touch_updated_at()') AS touched
        FROM information_schema.columns c
        WHERE c.table_schema = current_schema() AND c.column_name = 'updatedAt'
        """
    )
    untouched = [row["table_name"] for row in rows if not row["touched"]]
    assert rows, "no table has an updatedAt column"
    assert untouched == [], f"tables whose updatedAt no BEFORE UPDATE trigger keeps current: {', '.join(untouched)}"


def test_storage_enums_mirror_the_database_enum_types(catalog: Catalog) -> None:
    enum_types = catalog.enums
    mirrors = {
        name: tuple(member.value for member in value)
        for name, value in vars(storage.enums).items()
        if isinstance(value, type) and issubclass(value, StrEnum) and value.__module__ == storage.enums.__name__
    }
    assert sorted(mirrors) == sorted(enum_types), (
        f"only in storage/enums.py: {sorted(mirrors.keys() - enum_types.keys())}; "
        f"only in the database: {sorted(enum_types.keys() - mirrors.keys())}"
    )
    wrong = [
        f"{name}: {mirrors[name]} != database {values}"
        for name, values in enum_types.items()
        if mirrors[name] != values
    ]
    assert wrong == [], "StrEnums whose values differ from the database:\n" + "\n".join(wrong)
