"""/v1/tools: the integrations (calendars, CRMs, payments) the organization connects for its agents.

A tool's configuration holds credentials: it can be written, never read back; responses name its keys only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from engine.api.errors import ApiError
from engine.api.models import LongText, Name, RequestModel, ResponseModel, ShortText, UpdateModel, Url
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from pipelines.tools import InvalidToolFunction, tool_function
from storage import tools
from storage.tools import Tool

resource = Resource("Tools", "Integrations agents can use. Configurations (credentials) are write-only.")


class ToolView(ResponseModel):
    """A tool as the API shows it: everything but its configuration's values."""

    id: str
    organization_id: str
    name: str
    description: str | None
    category: str | None
    logo: str | None
    icon_bg_color: str | None
    is_connected: bool
    configuration_keys: list[str] = Field(description="The names set in the (write-only) configuration.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, tool: Tool) -> ToolView:
        """The view of a stored tool."""
        fields = tool.model_dump(exclude={"configuration"})
        keys = sorted(tool.configuration) if isinstance(tool.configuration, dict) else []  # another writer's shape
        return cls(**fields, configuration_keys=keys)


class ToolCreate(RequestModel):
    """A new tool; `configuration` is the integration's settings and credentials."""

    name: Name
    description: LongText | None = None
    category: ShortText | None = None
    logo: Url | None = None
    icon_bg_color: ShortText | None = None
    is_connected: bool = False
    configuration: dict[str, Any] = Field(default_factory=dict)


class ToolUpdate(UpdateModel):
    """Fields to change; `configuration` is replaced whole."""

    not_null = frozenset({"name", "is_connected", "configuration"})

    name: Name | None = None
    description: LongText | None = None
    category: ShortText | None = None
    logo: Url | None = None
    icon_bg_color: ShortText | None = None
    is_connected: bool | None = None
    configuration: dict[str, Any] | None = None


def _check_function(configuration: dict[str, Any]) -> None:
    """422 naming the field when the configuration's `function` or `webhook` could not serve a call."""
    try:
        tool_function("", configuration)
    except InvalidToolFunction as exc:
        (path, message), *more = exc.problems
        if more:
            message += f" (and {len(more)} more problem{'s' if len(more) > 1 else ''})"
        field = f"configuration.{path}"
        raise ApiError(422, "validation_error", f"body {field}: {message}", field) from None


@resource.get("/tools", summary="List tools", response=Page[ToolView], query=PageQuery)
async def list_tools(call: ApiCall) -> Page[ToolView]:
    """The organization's tools, newest first."""
    query = call.query_as(PageQuery)
    async with call.tenant() as db:
        rows = await tools.list_tools_page(
            db, organization_id=call.caller.organization_id, limit=query.fetch_limit, before=query.position()
        )
    return to_page(Page[ToolView], [ToolView.of(row) for row in rows], query)


@resource.post("/tools", summary="Create a tool", response=ToolView, body=ToolCreate)
async def create_tool(call: ApiCall) -> ToolView:
    """Create a tool."""
    body = call.body_as(ToolCreate)
    _check_function(body.configuration)
    async with call.tenant() as db:
        tool = await tools.create_tool(db, organization_id=call.caller.organization_id, **body.model_dump())
    return ToolView.of(tool)


@resource.get("/tools/{toolId}", summary="Get a tool", response=ToolView)
async def get_tool(call: ApiCall) -> ToolView:
    """One tool, without its configuration's values."""
    async with call.tenant() as db:
        tool = await tools.get_tool(db, organization_id=call.caller.organization_id, tool_id=call.path["toolId"])
    return ToolView.of(tool)


@resource.patch("/tools/{toolId}", summary="Update a tool", response=ToolView, body=ToolUpdate)
async def update_tool(call: ApiCall) -> ToolView:
    """Change some of a tool's fields."""
    changes = call.body_as(ToolUpdate).changes()
    if "configuration" in changes:
        _check_function(changes["configuration"])
    async with call.tenant() as db:
        tool = await tools.update_tool(
            db, organization_id=call.caller.organization_id, tool_id=call.path["toolId"], changes=changes
        )
    return ToolView.of(tool)


@resource.delete("/tools/{toolId}", summary="Delete a tool")
async def delete_tool(call: ApiCall) -> None:
    """Delete a tool; agents that used it lose it."""
    async with call.tenant() as db:
        await tools.delete_tool(db, organization_id=call.caller.organization_id, tool_id=call.path["toolId"])
