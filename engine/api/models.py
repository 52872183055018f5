"""The API's model bases (request, partial update, response) and the field types requests share (storable text, ids)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel

from config.phone import region_code
from pipelines.llm.prompt import variable_name_refusal

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""What a resource id in a path or a filter looks like (CUIDs, and the ids seeds choose)."""

_STORABLE_TEXT = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL


class RequestModel(BaseModel):
    """A JSON request body or query string: camelCase names, unknown names refused.

    A body is validated strictly (operations.py): `0` is not a boolean, `"5"` and `5.0` are not integers.
    """

    model_config = ConfigDict(alias_generator=to_camel, validate_by_alias=True, validate_by_name=False, extra="forbid")


def _without_null(schema: dict[str, Any], model: type[BaseModel]) -> None:
    # Fields an update may leave out but not set to null: document them as not nullable.
    properties = schema.get("properties", {})
    for name in getattr(model, "not_null", ()):
        prop = properties.get(to_camel(name), {})
        options = [option for option in prop.get("anyOf", ()) if option != {"type": "null"}]
        if len(options) == 1:
            rest = {key: value for key, value in prop.items() if key not in {"anyOf", "default"}}
            prop.clear()
            prop.update(options[0], **rest)


class UpdateModel(RequestModel):
    """A partial update (PATCH): fields left out stay as they are; null clears a field, except `not_null` ones."""

    model_config = ConfigDict(json_schema_extra=_without_null)

    not_null: ClassVar[frozenset[str]] = frozenset()
    """Fields that may be left out but never set to null (they have no empty value)."""

    @field_validator("*")
    @classmethod
    def _not_null(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name in cls.not_null:
            raise ValueError("cannot be null; leave it out to keep its value")
        return value

    def changes(self) -> dict[str, Any]:
        """The fields the request sets, by their Python names."""
        return self.model_dump(exclude_unset=True)


class ResponseModel(BaseModel):
    """A JSON response made by the API itself (not a stored record): camelCase names."""

    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True, serialize_by_alias=True, frozen=True)


_ISO_8601 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_8601(value: Any) -> Any:
    # pydantic would also read a number, or a string of one ("0.5"), as seconds since 1970.
    if isinstance(value, datetime):
        return value
    if not (isinstance(value, str) and _ISO_8601.match(value)):
        raise ValueError("must be an ISO 8601 date and time with its UTC offset, e.g. 2026-11-01T09:30:00Z")
    # Read here: a body is validated strictly, and strict validation takes no string for a datetime once a validator
    # has handed it on (every expirationDate was refused "Input should be a valid datetime").
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 date and time with its UTC offset, e.g. 2026-11-01T09:30:00Z") from None


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is outside the supported range of dates") from None


Name = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True, pattern=_STORABLE_TEXT)]
"""A required human-readable name."""

ShortText = Annotated[str, StringConstraints(max_length=200, pattern=_STORABLE_TEXT)]
"""A label, a category, a type: short free text."""

LongText = Annotated[str, StringConstraints(max_length=100_000, pattern=_STORABLE_TEXT)]
"""A description, a prompt, a document's content."""

Url = Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=_STORABLE_TEXT)]
"""A URL as given; the resource checks its scheme where it matters."""

Id = Annotated[str, Field(pattern=ID_PATTERN)]
"""The id of another resource."""

Timestamp = Annotated[AwareDatetime, BeforeValidator(_iso_8601), AfterValidator(_utc)]
"""A date and time with its UTC offset, e.g. 2026-11-01T09:30:00Z."""

Region = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$"), AfterValidator(region_code)]
"""The region (ISO 3166, e.g. US) numbers written without a +country code are read in: one config.phone reads."""


def no_built_in_names(variables: dict[str, str]) -> dict[str, str]:
    """A request's prompt `variables`, or a ValueError naming the first one named like a built-in prompt variable
    (`today`, `customer`: pipelines.llm.prompt.variable_name_refusal, the rule wherever variables are given)."""
    for name in variables:
        refusal = variable_name_refusal(name)
        if refusal is not None:
            raise ValueError(f"{refusal}; rename it")
    return variables
