"""`dialtone seed-demo`: a demo organization ready to take a call on the offline providers; idempotent.

Running it again creates nothing new and never shows a secret twice: the owner's password and the API key
are printed only by the run that created them (they are stored as an argon2 hash and a SHA-256 hash).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from config.agent import parse_agent_configuration
from storage import agents, api_keys, conversation_paths, organizations, phone_numbers, users, voices
from storage.agents import Agent
from storage.enums import AgentStatus, CallerType, Plan, UserRole, UserStatus
from storage.errors import AlreadyExists
from storage.phone_numbers import PhoneNumber
from storage.records import Queryable, transaction

DEMO_SLUG = "demo"
DEMO_ORGANIZATION_NAME = "Dialtone Demo"
DEMO_OWNER_EMAIL = "owner@demo.dialtone.dev"
DEMO_PHONE_NUMBER = "+15555550100"
DEMO_API_KEY_NAME = "Demo key"
DEMO_AGENT_NAME = "Front desk (offline)"
DEMO_PATH_NAME = "Front desk"
DEMO_CREDITS = 1000
_SEED_LOCK = "dialtone.seed-demo"


@dataclass(frozen=True, slots=True)
class SystemVoice:
    """A voice every organization may use."""

    name: str
    provider: str
    provider_voice_id: str
    gender: str
    tags: tuple[str, ...]
    avatar: str


SYSTEM_VOICES = (
    SystemVoice("Ava (eSpeak, US English)", "espeak", "en-us", "female", ("english", "american", "offline"), "#4F46E5"),
    SystemVoice(
        "Oliver (eSpeak, British English)", "espeak", "en-gb", "male", ("english", "british", "offline"), "#0EA5E9"
    ),
    SystemVoice(
        "Rachel (ElevenLabs)", "elevenlabs", "21m00Tcm4TlvDq8ikWAM", "female", ("english", "american"), "#DB2777"
    ),
)

# A react-flow graph the conversation-path runner walks (node types: pipelines/paths/graph.py): a speak node says
# its text and an edge is taken when the caller says one of its keywords (or presses its digit); `isStart` marks
# the first node. Pressing 9 at the greeting gathers a booking number (four digits, or # to finish), then waits
# for whatever the caller adds before ending the call.
DEMO_PATH_NODES: list[dict[str, Any]] = [
    {
        "id": "greeting",
        "type": "speak",
        "position": {"x": 0, "y": 0},
        "data": {
            "label": "Greeting",
            "isStart": True,
            "text": "Would you like to book an appointment, or hear our opening hours?",
        },
    },
    {
        "id": "book",
        "type": "speak",
        "position": {"x": -200, "y": 150},
        "data": {"label": "Book", "text": "Sure. Which day would suit you, Monday to Friday?"},
    },
    {
        "id": "hours",
        "type": "speak",
        "position": {"x": 200, "y": 150},
        "data": {
            "label": "Hours",
            "text": "We are open nine to five, Monday to Friday. Would you like to book an appointment?",
        },
    },
    {
        "id": "confirm",
        "type": "end",
        "position": {"x": -200, "y": 300},
        "data": {"label": "Confirm", "text": "Great, you are booked in. Thank you for calling. Goodbye!"},
    },
    {
        "id": "goodbye",
        "type": "end",
        "position": {"x": 200, "y": 300},
        "data": {"label": "Goodbye", "text": "Thank you for calling. Goodbye!"},
    },
    {
        "id": "booking-number",
        "type": "gather",
        "position": {"x": 500, "y": 150},
        "data": {
            "label": "Booking number",
            "text": "Please enter your four digit booking number, or finish with the pound key.",
            "variable": "booking_number",
            "digitCount": 4,
            "terminator": "#",
        },
    },
    {
        "id": "anything-else",
        "type": "wait",
        "position": {"x": 500, "y": 300},
        "data": {"label": "Anything else", "text": "Thank you. Is there anything you would like us to know?"},
    },
    {
        "id": "noted",
        "type": "end",
        "position": {"x": 500, "y": 450},
        "data": {"label": "Noted", "text": "Noted, we will be in touch. Goodbye!"},
    },
]
_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "tomorrow"]
DEMO_PATH_EDGES: list[dict[str, Any]] = [
    {"id": "greeting-book", "source": "greeting", "target": "book", "data": {"keywords": ["book", "appointment"]}},
    {"id": "greeting-hours", "source": "greeting", "target": "hours", "data": {"keywords": ["hours", "open"]}},
    {"id": "book-confirm", "source": "book", "target": "confirm", "data": {"keywords": _WEEKDAYS}},
    {"id": "hours-book", "source": "hours", "target": "book", "data": {"keywords": ["yes", "book", "appointment"]}},
    {"id": "hours-goodbye", "source": "hours", "target": "goodbye", "data": {"keywords": ["no", "bye", "thanks"]}},
    {"id": "greeting-booking-number", "source": "greeting", "target": "booking-number", "data": {"digit": "9"}},
    {"id": "booking-number-entered", "source": "booking-number", "target": "anything-else"},
    {"id": "anything-else-noted", "source": "anything-else", "target": "noted"},
]

DEMO_AGENT_CONFIGURATION: dict[str, Any] = {
    "stt": {"provider": "sphinx"},
    "llm": {"provider": "conversation_path"},
    "tts": {"provider": "espeak", "voice": "en-us"},
    "firstSentence": "Thanks for calling the Dialtone demo front desk.",
    "goodbyeSentence": "Thank you for calling. Goodbye!",
}


@dataclass(frozen=True, slots=True)
class DemoSeed:
    """What seed-demo found or made; secrets only when this run created them."""

    organization_id: str
    agent_id: str
    phone_number: str
    owner_email: str
    owner_password: str | None
    api_key: str | None
    created: list[str] = field(default_factory=list)
    moved_from: str | None = None
    """The number the agent answered before this run moved it to `phone_number`."""

    def describe(self) -> str:
        """Lines for the terminal; the secrets appear only on the run that created them."""
        lines = [
            f"demo organization '{DEMO_SLUG}' ({self.organization_id})",
            f"  inbound agent {DEMO_AGENT_NAME!r} ({self.agent_id}) answers {self.phone_number}",
            f"  owner {self.owner_email}",
        ]
        if self.owner_password:
            lines.append(f"  owner password (shown once): {self.owner_password}")
        if self.api_key:
            lines.append(f"  API key (shown once, stored only as a hash): {self.api_key}")
        if self.created:
            lines.append("  created: " + ", ".join(self.created))
        if self.moved_from:
            lines.append(f"  moved the agent from {self.moved_from} to {self.phone_number}")
        if not self.created and not self.moved_from:
            lines.append("  already seeded: nothing new")
        return "\n".join(lines)


async def seed_demo(db: Queryable, *, phone_number: str | None = None) -> DemoSeed:
    """Create whatever part of the demo is missing, in one transaction; safe to run concurrently.

    The agent answers `phone_number` when one is given (moved there from the number it answered), else the number
    it already answers, else DEMO_PHONE_NUMBER: a run without a number never undoes a run with one.
    """
    created: list[str] = []
    async with transaction(db) as conn:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", _SEED_LOCK)

        organization = await organizations.get_organization_by_slug(conn, slug=DEMO_SLUG)
        if organization is None:
            organization = await organizations.create_organization(
                conn, name=DEMO_ORGANIZATION_NAME, slug=DEMO_SLUG, plan=Plan.PRO, credits=DEMO_CREDITS
            )
            created.append("organization")
        org_id = organization.id

        password: str | None = None
        owner = await users.get_user_by_email(conn, email=DEMO_OWNER_EMAIL)
        if owner is None:
            password = secrets.token_urlsafe(12)
            owner = await users.create_user(
                conn,
                email=DEMO_OWNER_EMAIL,
                password=password,
                first_name="Demo",
                last_name="Owner",
                role=UserRole.OWNER,
                status=UserStatus.ACTIVE,
            )
            created.append("owner")
        if await users.find_membership(conn, organization_id=org_id, user_id=owner.id) is None:
            await users.add_member(conn, user_id=owner.id, organization_id=org_id, role=UserRole.OWNER)

        api_key: str | None = None
        if not any(key.name == DEMO_API_KEY_NAME for key in await api_keys.list_api_keys(conn, organization_id=org_id)):
            made = await api_keys.create_api_key(
                conn, organization_id=org_id, user_id=owner.id, name=DEMO_API_KEY_NAME, live=False
            )
            api_key = made.plaintext
            created.append("API key")

        voice_ids = {}
        for voice in SYSTEM_VOICES:
            row = await voices.upsert_system_voice(
                conn,
                name=voice.name,
                provider=voice.provider,
                provider_voice_id=voice.provider_voice_id,
                gender=voice.gender,
                tags=list(voice.tags),
                avatar=voice.avatar,
            )
            voice_ids[(voice.provider, voice.provider_voice_id)] = row.id

        existing = [a for a in await agents.list_agents(conn, organization_id=org_id) if a.name == DEMO_AGENT_NAME]
        agent = existing[0] if existing else None
        number = await _demo_number(conn, org_id, agent, phone_number, created)

        paths = [
            p
            for p in await conversation_paths.list_conversation_paths(conn, organization_id=org_id)
            if p.name == DEMO_PATH_NAME
        ]
        if paths:
            path = paths[0]
        else:
            path = await conversation_paths.create_conversation_path(
                conn,
                organization_id=org_id,
                name=DEMO_PATH_NAME,
                use_case="Inbound front desk: appointments and opening hours",
                agent_speech="Friendly and brief.",
                nodes=DEMO_PATH_NODES,
                edges=DEMO_PATH_EDGES,
            )
            created.append("conversation path")

        moved_from = None
        if agent is None:
            agent = await agents.create_agent(
                conn,
                organization_id=org_id,
                name=DEMO_AGENT_NAME,
                description="Answers the demo line with the offline providers: PocketSphinx, a path, eSpeak NG.",
                type="Inbound Support",
                status=AgentStatus.ACTIVE,
                caller_type=CallerType.INBOUND,
                phone_number_id=number.id,
                voice_id=voice_ids[("espeak", "en-us")],
                configuration=parse_agent_configuration(DEMO_AGENT_CONFIGURATION).to_json(),
            )
            created.append("agent")
        else:
            agent, moved_from = await _answering(conn, org_id, agent, number)
        await agents.link_conversation_path(
            conn, organization_id=org_id, agent_id=agent.id, conversation_path_id=path.id
        )

    return DemoSeed(
        organization_id=org_id,
        agent_id=agent.id,
        phone_number=number.phone_number,
        owner_email=owner.email,
        owner_password=password,
        api_key=api_key,
        created=created,
        moved_from=moved_from,
    )


async def _demo_number(
    conn: Queryable, org_id: str, agent: Agent | None, phone_number: str | None, created: list[str]
) -> PhoneNumber:
    """The number the demo agent is to answer: the one given, else its own, else DEMO_PHONE_NUMBER (made if new)."""
    if phone_number is None and agent is not None and agent.phone_number_id is not None:
        return await phone_numbers.get_phone_number(conn, organization_id=org_id, phone_number_id=agent.phone_number_id)
    wanted = phone_number or DEMO_PHONE_NUMBER
    number = await phone_numbers.find_by_number(conn, number=wanted)
    if number is None:
        created.append("phone number")
        return await phone_numbers.create_phone_number(
            conn, organization_id=org_id, phone_number=wanted, label="Demo line"
        )
    if number.organization_id != org_id:
        raise AlreadyExists("PhoneNumber", "phoneNumber", number.phone_number)
    return number


async def _answering(conn: Queryable, org_id: str, agent: Agent, number: PhoneNumber) -> tuple[Agent, str | None]:
    """The agent, now answering `number`; and the number it answered before this move (None if it did not move)."""
    if agent.phone_number_id == number.id:
        return agent, None
    before = None
    if agent.phone_number_id is not None:
        old = await phone_numbers.get_phone_number(conn, organization_id=org_id, phone_number_id=agent.phone_number_id)
        before = old.phone_number
    moved = await agents.update_agent(
        conn, organization_id=org_id, agent_id=agent.id, changes={"phone_number_id": number.id}
    )
    return moved, before
