"""The language-model seam: given the conversation so far, stream what the agent says next."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pipelines.errors import LLMError

__all__ = [
    "ConversationTurn",
    "EndCall",
    "LLMError",
    "LLMEvent",
    "LanguageModel",
    "MessageRole",
    "OptOut",
    "Rewinds",
    "SendDtmf",
    "TakesMessages",
    "TextDelta",
    "TransferCall",
]


@dataclass(frozen=True, slots=True)
class ConversationTurn:
    """One turn as the agent should remember it: the agent's turns cut to what the caller actually heard."""

    role: Literal["caller", "agent"]
    text: str


@dataclass(frozen=True, slots=True)
class TextDelta:
    """More of the agent's reply, to be spoken in order."""

    text: str


@dataclass(frozen=True, slots=True)
class EndCall:
    """The agent ends the call once what it said so far has been played."""

    reason: str


@dataclass(frozen=True, slots=True)
class TransferCall:
    """Transfer the caller (cold) to `to`, an E.164 number, once what was said so far has been played."""

    to: str
    reason: str
    asked: Mapping[str, Any] | None = None
    """The arguments of the model's `transfer_call` that asked for it (its tool.call event), None for a path's own."""


@dataclass(frozen=True, slots=True)
class SendDtmf:
    """Play touch tones (`0-9`, `*`, `#`, `w` for a half-second pause) into the call, in order with the speech."""

    digits: str


@dataclass(frozen=True, slots=True)
class OptOut:
    """The callee asked not to be called again: list their number, confirm it to them, and end the call."""

    reason: str
    phrase: str | None = None
    """The opt-out phrase the offline model heard; None when the model called `opt_out`."""


MessageRole = Literal["system", "user"]
"""Who a message added to a model's context from outside the conversation speaks as (engine.call live controls)."""

LLMEvent = TextDelta | EndCall | TransferCall | SendDtmf | OptOut


class LanguageModel(Protocol):
    """A call's conversation logic. It may keep state across turns (e.g. where it is on a path)."""

    @property
    def scripted_opening(self) -> bool:
        """Whether `respond([])` gives scripted opening words to say after the agent's first sentence (a path does).

        A chat model is asked for an opening only when the agent has no first sentence.
        """
        ...

    def respond(self, conversation: Sequence[ConversationTurn]) -> AsyncIterator[LLMEvent]:
        """Stream the reply to the conversation, whose last turn is the caller's; cancelling stops it."""
        ...

    async def close(self) -> None:
        """Release what the model holds; idempotent."""
        ...


@runtime_checkable
class Rewinds(Protocol):
    """A model whose `respond` moves state of its own (a conversation path's node), which a reply thrown away
    before the caller heard it (a speculative one) must not keep."""

    def checkpoint(self) -> object:
        """The state now, to `rewind` to."""
        ...

    def rewind(self, checkpoint: object) -> None:
        """Go back to a state `checkpoint` returned."""
        ...


@runtime_checkable
class TakesMessages(Protocol):
    """A model that takes messages from outside the conversation (an operator's, through the live-call API) into the
    context of its replies."""

    def add_message(self, role: MessageRole, content: str, *, after_turns: int) -> bool:
        """Put `content` in the context of every reply from now on, after the conversation's first `after_turns`
        turns; False when this model takes no messages after all (nothing was added).

        A message is no reply's state: rewinding a discarded reply (`Rewinds`) keeps it.
        """
        ...
