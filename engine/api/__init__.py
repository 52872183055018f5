"""The platform REST API under /v1: JSON over aiohttp, Bearer API keys, one error shape, OpenAPI 3.1.

How it fits together:

- `routes.add_api_routes(app)` mounts a sub-application at /v1 whose middlewares apply to /v1 only:
  `errors.error_middleware` (every failure, including unknown paths, wrong methods, bad JSON and
  validation errors, answers `{"error": {"code", "message", "field"}}`) and `auth.auth_middleware`
  (the Bearer key resolves to a `Caller`: organization, user, that user's role there; VIEWERs may only
  GET). GET /v1/openapi.json needs no key.
- Each module in `resources/` declares one `Resource` (a tag of the OpenAPI document) and its operations
  with decorators that name the request and response models. The same declarations make the aiohttp
  routes and the OpenAPI document (`openapi.py`), so the document cannot drift from the code.
- A handler takes an `ApiCall` and returns a pydantic model (or None for 204). Its path ids are checked,
  its query and body already validated. Every query runs in `call.tenant()`, a transaction as the
  `dialtone_api` role scoped to the caller's organization, so row-level security backs up the
  `organizationId` every storage function also filters on. Storage errors map to statuses in one place.
- Lists take `limit` and an opaque `cursor` (`pagination.PageQuery`) and answer a `Page[T]` newest first.

Adding a resource (e.g. campaigns):

    # engine/api/resources/campaigns.py
    resource = Resource("Campaigns", "Outbound calling campaigns.")

    class CampaignCreate(RequestModel):
        batch_name: Name
        agent_id: Id

    @resource.post("/campaigns", summary="Create a campaign", response=Campaign, body=CampaignCreate)
    async def create_campaign(call: ApiCall) -> Campaign:
        \"\"\"Create a DRAFT campaign.\"\"\"
        body = call.body_as(CampaignCreate)
        async with call.tenant() as db:
            return await campaigns.create_campaign(db, organization_id=call.caller.organization_id, ...)

then add `campaigns.resource` to `routes.RESOURCES`. Request models derive from `RequestModel` (camelCase,
unknown fields refused) or `UpdateModel` for PATCH; responses are storage `Record`s or `ResponseModel`s.
Use the field types in `models.py` (Name, ShortText, LongText, Url, Id, Timestamp): they refuse what
PostgreSQL cannot store, so bad input is a 422, never a 500.
"""
