"""/v1/events: webhook subscriptions, the URL that hears a call event for the organization or one agent."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from pydantic import Field

from engine.api.errors import ApiError, unprocessable
from engine.api.models import Id, LongText, RequestModel, ResponseModel, UpdateModel, Url
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from engine.server.appkeys import SETTINGS
from pipelines.url_safety import UnsafeURL, check_public_address, literal_address
from storage import events, webhook_outbox
from storage.events import Event, InvalidWebhookUrl
from storage.webhook_outbox import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookEvent

resource = Resource("Events", "Webhook subscriptions: when an event happens, its URL gets a POST.")


class EventCreate(RequestModel):
    """A subscription for the whole organization, or for one agent when `agentId` is given."""

    name: WebhookEvent = Field(description="The event to hear.")
    webhook_url: Url = Field(description="An absolute http(s) URL.")
    description: LongText | None = None
    agent_id: Id | None = None
    is_enabled: bool = True


class EventUpdate(UpdateModel):
    """Fields to change; a null `agentId` makes the subscription organization-wide."""

    not_null = frozenset({"name", "webhook_url", "is_enabled"})

    name: WebhookEvent | None = None
    webhook_url: Url | None = None
    description: LongText | None = None
    agent_id: Id | None = None
    is_enabled: bool | None = None


def _check_address(call: ApiCall, url: str | None) -> None:
    """Refuse a URL naming a loopback, private or link-local address (unless the engine allows them).

    Host names are checked again at every delivery, against the address connected to (DNS can change).
    """
    if url is None or call.app[SETTINGS].allow_private_webhook_urls:
        return
    host = urlsplit(url).hostname or ""
    address = literal_address(host) or ("127.0.0.1" if host == "localhost" or host.endswith(".localhost") else None)
    if address is not None:
        try:
            check_public_address(host, address)
        except UnsafeURL as exc:
            raise unprocessable(f"webhookUrl: {exc}; webhooks go to public addresses only", "webhookUrl") from None


@contextmanager
def _deliverable_url() -> Iterator[None]:
    try:
        yield
    except InvalidWebhookUrl as exc:
        raise unprocessable(str(exc), "webhookUrl") from None


@resource.get("/events", summary="List webhook subscriptions", response=Page[Event], query=PageQuery)
async def list_events(call: ApiCall) -> Page[Event]:
    """The organization's subscriptions, enabled or not, newest first."""
    query = call.query_as(PageQuery)
    async with call.tenant() as db:
        rows = await events.list_events_page(
            db, organization_id=call.caller.organization_id, limit=query.fetch_limit, before=query.position()
        )
    return to_page(Page[Event], rows, query)


@resource.post("/events", summary="Subscribe a webhook", response=Event, body=EventCreate)
async def create_event(call: ApiCall) -> Event:
    """Subscribe a URL to an event."""
    body = call.body_as(EventCreate)
    _check_address(call, body.webhook_url)
    with _deliverable_url():
        async with call.tenant() as db:
            return await events.create_event(db, organization_id=call.caller.organization_id, **body.model_dump())


@resource.get("/events/{eventId}", summary="Get a webhook subscription", response=Event)
async def get_event(call: ApiCall) -> Event:
    """One subscription."""
    async with call.tenant() as db:
        return await events.get_event(db, organization_id=call.caller.organization_id, event_id=call.path["eventId"])


@resource.patch("/events/{eventId}", summary="Update a webhook subscription", response=Event, body=EventUpdate)
async def update_event(call: ApiCall) -> Event:
    """Change a subscription, or switch it on or off."""
    changes = call.body_as(EventUpdate).changes()
    _check_address(call, changes.get("webhook_url"))
    with _deliverable_url():
        async with call.tenant() as db:
            return await events.update_event(
                db, organization_id=call.caller.organization_id, event_id=call.path["eventId"], changes=changes
            )


@resource.delete("/events/{eventId}", summary="Delete a webhook subscription")
async def delete_event(call: ApiCall) -> None:
    """Delete a subscription."""
    async with call.tenant() as db:
        await events.delete_event(db, organization_id=call.caller.organization_id, event_id=call.path["eventId"])


class DeliveryQuery(PageQuery):
    """A page of the delivery log, optionally of one status."""

    status: DeliveryStatus | None = None


class DeliveryDetail(ResponseModel):
    """One delivery and every attempt at it, with the receiver's response codes."""

    delivery: WebhookDelivery
    attempts: list[WebhookAttempt]


class SigningSecret(ResponseModel):
    """The secret the organization's webhooks are signed with (see the README's Webhooks section)."""

    secret: str


@resource.get(
    "/events/{eventId}/deliveries",
    summary="List a subscription's deliveries",
    response=Page[WebhookDelivery],
    query=DeliveryQuery,
)
async def list_event_deliveries(call: ApiCall) -> Page[WebhookDelivery]:
    """The subscription's delivery log, newest first: status, attempts, last response code. Finished deliveries are
    kept DIALTONE_WEBHOOK_HISTORY_DAYS (30) days after their event."""
    query = call.query_as(DeliveryQuery)
    organization_id = call.caller.organization_id
    async with call.tenant() as db:
        await events.get_event(db, organization_id=organization_id, event_id=call.path["eventId"])
        rows = await webhook_outbox.list_deliveries(
            db,
            organization_id=organization_id,
            event_id=call.path["eventId"],
            status=query.status,
            limit=query.fetch_limit,
            before=query.position(),
        )
    return to_page(Page[WebhookDelivery], rows, query)


@resource.get("/webhook-deliveries", summary="List deliveries", response=Page[WebhookDelivery], query=DeliveryQuery)
async def list_all_deliveries(call: ApiCall) -> Page[WebhookDelivery]:
    """Every delivery of the organization's webhooks, newest first. Finished deliveries are kept
    DIALTONE_WEBHOOK_HISTORY_DAYS (30) days after their event."""
    query = call.query_as(DeliveryQuery)
    async with call.tenant() as db:
        rows = await webhook_outbox.list_deliveries(
            db,
            organization_id=call.caller.organization_id,
            status=query.status,
            limit=query.fetch_limit,
            before=query.position(),
        )
    return to_page(Page[WebhookDelivery], rows, query)


@resource.get("/webhook-deliveries/{deliveryId}", summary="Get a delivery and its attempts", response=DeliveryDetail)
async def get_delivery(call: ApiCall) -> DeliveryDetail:
    """One delivery, its payload, and each attempt's response code, error and duration."""
    organization_id, delivery_id = call.caller.organization_id, call.path["deliveryId"]
    async with call.tenant() as db:
        delivery = await webhook_outbox.get_delivery(db, organization_id=organization_id, delivery_id=delivery_id)
        attempts = await webhook_outbox.list_attempts(db, organization_id=organization_id, delivery_id=delivery_id)
    return DeliveryDetail(delivery=delivery, attempts=attempts)


@resource.get(
    "/webhook-signing-secret", summary="Get the webhook signing secret", response=SigningSecret, errors=(403, 404)
)
async def get_signing_secret(call: ApiCall) -> SigningSecret:
    """The secret to verify `Dialtone-Signature` with; created on first use. Not for VIEWERs (403)."""
    if not call.caller.can_write:
        raise ApiError(403, "forbidden", "the webhook signing secret is for OWNERs and ADMINs only")
    async with call.tenant() as db:
        secret = await webhook_outbox.signing_secret(db, organization_id=call.caller.organization_id)
    return SigningSecret(secret=secret)
