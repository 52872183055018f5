"""The language model of last resort: a few fixed rules for an agent that has no conversation path, and the agent's
knowledge bases for what the rules cannot answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Final

from pipelines.llm.base import ConversationTurn, EndCall, LLMEvent, TextDelta
from pipelines.llm.conversation_path import normalize_words

__all__ = ["SimpleResponder"]

_GOODBYE_WORDS: Final = frozenset({"bye", "goodbye", "byebye"})
_GOODBYE_PHRASES: Final = (("hang", "up"), ("that", "all"), ("thats", "all"))
_THANKS_WORDS: Final = frozenset({"thank", "cheer"})
_GREETING_WORDS: Final = frozenset({"hello", "hi", "hey", "hiya", "howdy"})
_GREETING_PHRASES: Final = (("good", "morn"), ("good", "afternoon"), ("good", "even"))
_QUESTION_WORDS: Final = frozenset(
    {"what", "when", "where", "who", "why", "how", "which", "can", "could", "do", "doe", "is", "are", "will", "would"}
)

GOODBYE: Final = "Thank you for calling. Goodbye!"
YOU_ARE_WELCOME: Final = "You're welcome. Is there anything else I can help you with?"
HELLO: Final = "Hello! How can I help you today?"
HOLDING_ANSWER: Final = (
    "That's a good question, but I'm not able to answer it on this line. Is there anything else I can help you with?"
)
FALLBACK: Final = "I see. Is there anything else I can help you with?"


def _has_phrase(words: Sequence[str], phrases: Sequence[tuple[str, ...]]) -> bool:
    return any(tuple(words[i : i + len(p)]) == p for p in phrases for i in range(len(words) - len(p) + 1))


class SimpleResponder:
    """Deterministic replies by rule (goodbye, thanks, greeting, question, anything else); no network."""

    scripted_opening = True
    """respond([]) gives the opening words."""

    def __init__(self, *, goodbye: str = GOODBYE, answer: Callable[[str], Awaitable[str | None]] | None = None) -> None:
        """Create the responder; `goodbye` is what it says before ending the call, and `answer`, when given, answers
        what no rule but the question's or the last does, when it can (from the agent's knowledge bases:
        pipelines.knowledge.PassageAnswerer)."""
        self._goodbye = goodbye
        self._answer = answer

    def opening(self) -> str | None:
        """Nothing to add after the agent's first sentence."""
        return None

    async def respond(self, conversation: Sequence[ConversationTurn]) -> AsyncIterator[LLMEvent]:
        """Answer the caller's last turn by the first rule that applies; a question, or words no other rule takes,
        from the knowledge answerer first, when it has an answer."""
        for event in await self._reply(conversation):
            yield event

    async def close(self) -> None:
        """Nothing to release."""

    async def _reply(self, conversation: Sequence[ConversationTurn]) -> list[LLMEvent]:
        if not conversation or conversation[-1].role != "caller":
            return [TextDelta(HELLO)]
        text = conversation[-1].text
        words = normalize_words(text)
        if _GOODBYE_WORDS.intersection(words) or _has_phrase(words, _GOODBYE_PHRASES):
            return [TextDelta(self._goodbye), EndCall(reason="caller_goodbye")]
        if _THANKS_WORDS.intersection(words):
            return [TextDelta(YOU_ARE_WELCOME)]
        if _GREETING_WORDS.intersection(words) or _has_phrase(words, _GREETING_PHRASES):
            return [TextDelta(HELLO)]
        if self._answer is not None and (answer := await self._answer(text)):
            return [TextDelta(answer)]
        if text.rstrip().endswith("?") or (words and words[0] in _QUESTION_WORDS):
            return [TextDelta(HOLDING_ANSWER)]
        return [TextDelta(FALLBACK)]
