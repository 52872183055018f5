"""Python mirrors of the schema's PostgreSQL enum types (tests check they match the database)."""

from __future__ import annotations

from enum import StrEnum


class Plan(StrEnum):
    """An organization's subscription plan."""

    FREE = "free"
    PRO = "pro"
    ENTERPRISE = "enterprise"


class UserRole(StrEnum):
    """What a user may do, globally or in one organization."""

    OWNER = "OWNER"
    ADMIN = "ADMIN"
    VIEWER = "VIEWER"


class UserStatus(StrEnum):
    """Whether a user's account is usable."""

    ACTIVE = "ACTIVE"
    PENDING = "PENDING"


class AgentStatus(StrEnum):
    """Whether an agent takes calls."""

    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"


class CallerType(StrEnum):
    """Which way an agent's calls go."""

    INBOUND = "INBOUND"
    OUTBOUND = "OUTBOUND"


class CampaignStatus(StrEnum):
    """Where a campaign is in its lifecycle."""

    DRAFT = "DRAFT"
    PLANNED = "PLANNED"
    CONTINUING = "CONTINUING"
    COMPLETED = "COMPLETED"
    STOPPED = "STOPPED"


class RecipientStatus(StrEnum):
    """Whether a campaign recipient can be called."""

    READY = "READY"
    ERROR = "ERROR"


class CallType(StrEnum):
    """Which way a call went."""

    INBOUND = "INBOUND"
    OUTBOUND = "OUTBOUND"


class CallStatus(StrEnum):
    """Where a call stands."""

    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    MISSED = "MISSED"
    IN_PROGRESS = "IN_PROGRESS"


class KnowledgeBaseStatus(StrEnum):
    """Whether a knowledge base is ready for agents."""

    PROCESSING = "PROCESSING"
    READY = "READY"
    ACTIVE = "ACTIVE"
    EMPTY = "EMPTY"


class DocumentType(StrEnum):
    """Where a knowledge-base document comes from."""

    FILE = "FILE"
    WEBSITE = "WEBSITE"
    TEXT = "TEXT"


class DocumentStatus(StrEnum):
    """Whether a document has been ingested."""

    PROCESSING = "PROCESSING"
    READY = "READY"
    ERROR = "ERROR"


class VoiceStatus(StrEnum):
    """Whether a voice can speak."""

    READY = "READY"
    PROCESSING = "PROCESSING"
    ERROR = "ERROR"


class PhoneNumberStatus(StrEnum):
    """Whether a number takes calls in one direction."""

    ENABLED = "ENABLED"
    DISABLED = "DISABLED"


class ApiKeyStatus(StrEnum):
    """Whether an API key is accepted."""

    ACTIVE = "ACTIVE"
    REVOKED = "REVOKED"
