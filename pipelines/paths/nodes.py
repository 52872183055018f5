"""The `data` of each node type of a conversation path, as pydantic models (one per `type`).

react-flow's stock `default`, `input` and `output` nodes are the original speak nodes (`LegacyData`). Edge data
is here too: `label`, `condition`, `keywords`, `digit`, and `result` for an edge out of a webhook node.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from config.agent import MAX_SPOKEN_CHARS
from config.phone import InvalidPhoneNumber, e164
from media.dtmf import DIGITS_HELP, InvalidDigits, check_digits

__all__ = [
    "EDGE_DATA",
    "LEGACY_TYPES",
    "NODE_TYPES",
    "TYPED_NODES",
    "EdgeData",
    "EndData",
    "GatherData",
    "GlobalData",
    "KnowledgeData",
    "LegacyData",
    "NodeData",
    "PressDigitsData",
    "PromptData",
    "SpeakData",
    "TransferData",
    "VariableSpec",
    "WaitData",
    "WebhookData",
]

LEGACY_TYPES: Final = frozenset({"default", "input", "output"})
"""react-flow's stock node types: a node that says its text (`text`, `prompt` or `label`), ending the call on
`endCall` (or as an `output` node with no way out)."""

_Text = Annotated[str, Field(min_length=1, max_length=MAX_SPOKEN_CHARS)]
_Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class VariableSpec(BaseModel):
    """A variable the model extracts from what the caller said at this node (into the call's variables)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _Name
    description: str = ""


class _Data(BaseModel):
    """Fields every typed node has: its label in the builder, whether it starts the path, variables it asks for."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    label: str | None = None
    is_start: bool = Field(False, alias="isStart")
    extract_variables: list[VariableSpec] = Field(default_factory=list, alias="extractVariables", max_length=20)


class SpeakData(_Data):
    """Say `text` word for word, then wait for the caller's answer to choose an edge."""

    type: Literal["speak"] = "speak"
    text: _Text


class PromptData(_Data):
    """The model speaks from `instructions`; `text` is what the offline model says here (it cannot improvise)."""

    type: Literal["prompt"] = "prompt"
    instructions: _Text
    text: _Text | None = None


class WaitData(_Data):
    """Say nothing (or `text`) and wait for the caller to speak; their answer chooses the edge."""

    type: Literal["wait"] = "wait"
    text: _Text | None = None


class GatherData(_Data):
    """Collect keypad digits into `variable`: `digitCount` of them, or up to the `terminator` key."""

    type: Literal["gather"] = "gather"
    text: _Text | None = None
    variable: _Name
    digit_count: int | None = Field(None, alias="digitCount", ge=1, le=32)
    terminator: Literal["#", "*"] | None = None
    timeout_seconds: float = Field(5.0, alias="timeoutSeconds", gt=0, le=60)

    @model_validator(mode="after")
    def _completes(self) -> GatherData:
        if self.digit_count is None and self.terminator is None:
            raise ValueError("a gather node needs digitCount or terminator (or both)")
        return self


class EndData(_Data):
    """Say the closing line `text` (if any) and hang up."""

    type: Literal["end"] = "end"
    text: _Text | None = None


class TransferData(_Data):
    """Say `text` (if any) and transfer the caller to `number` (E.164), if the agent's transfer rules allow it."""

    type: Literal["transfer"] = "transfer"
    number: str
    text: _Text | None = None

    @field_validator("number")
    @classmethod
    def _e164(cls, value: str) -> str:
        try:
            return e164(value)
        except InvalidPhoneNumber as exc:
            raise ValueError(f"is not a phone number in E.164 (+15551234567): {exc}") from None


class WebhookData(_Data):
    """Call the agent's Tool function `tool` with the call's variables; edges with `result` success/failure route."""

    type: Literal["webhook"] = "webhook"
    tool: _Name
    text: _Text | None = None
    variable: _Name | None = None
    """Where the tool's reply is kept among the call's variables."""


class KnowledgeData(_Data):
    """Answer the caller's question from the agent's knowledge bases; `fallback` when there is nothing to say."""

    type: Literal["knowledge"] = "knowledge"
    fallback: _Text
    instructions: _Text | None = None


class PressDigitsData(_Data):
    """Play `digits` as touch tones into the call (to walk a phone menu), then follow the way out."""

    type: Literal["press_digits"] = "press_digits"
    digits: str

    @field_validator("digits")
    @classmethod
    def _dialable(cls, value: str) -> str:
        try:
            return check_digits(value)
        except InvalidDigits:
            raise ValueError(f"cannot be dialled: {DIGITS_HELP}") from None


class GlobalData(_Data):
    """Reachable from any node when `condition` holds (e.g. 'the caller asks for a human'); `keywords` offline."""

    type: Literal["global"] = "global"
    condition: _Text
    keywords: list[str] = Field(default_factory=list, max_length=50)
    text: _Text | None = None
    instructions: _Text | None = None


class LegacyData(BaseModel):
    """A react-flow stock node (`default`, `input`, `output` or no type) as the builder saved it."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    type: Literal["legacy"] = "legacy"
    label: str | None = None
    is_start: bool = Field(False, alias="isStart")
    text: str | None = None
    prompt: str | None = None
    end_call: bool = Field(False, alias="endCall")
    extract_variables: list[VariableSpec] = Field(default_factory=list, alias="extractVariables")


NodeData = (
    SpeakData
    | PromptData
    | WaitData
    | GatherData
    | EndData
    | TransferData
    | WebhookData
    | KnowledgeData
    | PressDigitsData
    | GlobalData
    | LegacyData
)
TYPED_NODES: Final[dict[str, type[_Data]]] = {
    "speak": SpeakData,
    "prompt": PromptData,
    "wait": WaitData,
    "gather": GatherData,
    "end": EndData,
    "transfer": TransferData,
    "webhook": WebhookData,
    "knowledge": KnowledgeData,
    "press_digits": PressDigitsData,
    "global": GlobalData,
}
NODE_TYPES: Final = frozenset(TYPED_NODES) | LEGACY_TYPES
"""Every node type a path may use."""


class EdgeData(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    label: str | None = None
    condition: str | None = None
    keywords: str | list[str] | None = None
    digit: int | str | None = None
    result: Literal["success", "failure"] | None = None


EDGE_DATA = TypeAdapter(EdgeData)
