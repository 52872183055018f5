"""Embeddings of knowledge-base passages and callers' questions, through the OpenAI SDK.

Passages are embedded by the ingestion worker, in batches, each request retried with backoff on a rate limit, a
server error or a lost connection (`embed_pending_passages`); never on a call's audio path. A batch the API refuses
(400, 422) is split until the passages it refuses on their own are found: those are set aside, the others embedded.
A caller's question is embedded once, with a short timeout and no retry, while its full-text search runs
(engine/knowledge/lookup.py): the call falls back to full-text alone rather than wait. Once the API has refused the
engine's key (401, 403, or a 429 saying its account has no quota left; to a question or to the passages), questions
are not sent at all, but one now and then (`KEY_RETRY_INITIAL`, doubling up to `KEY_RETRY_MAX`) to learn whether the
key works again; any request it takes ends that at once.

On with DIALTONE_KB_EMBEDDING_MODEL, on a database with pgvector (migration 0021); `embedder_from_settings` says
plainly in the log when vector search is off and why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import openai

from config.agent import OpenAILLMConfig
from config.settings import EMBEDDING_DIMENSIONS, Settings
from pipelines.clients import ProviderClients
from pipelines.errors import ProviderKeyMissing
from pipelines.registry import ProviderKeys, provider_key
from storage import Pool
from storage.knowledge_embeddings import (
    EmbeddingModel,
    PendingPassage,
    claim_pending,
    record_refusals,
    store_embeddings,
    vector_search_available,
)
from storage.records import transaction

if TYPE_CHECKING:
    from openai import AsyncOpenAI

log = logging.getLogger(__name__)

_RETRIED: Final = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
"""Failures worth another attempt: 429, 5xx, a connection lost or timed out (APITimeoutError is one)."""
_REFUSED: Final = (openai.BadRequestError, openai.UnprocessableEntityError)
"""The API refusing the texts themselves (past the model's token limit, content it rejects): sent again unchanged,
they would be refused again."""

_KEY_REFUSED: Final = (openai.AuthenticationError, openai.PermissionDeniedError)
"""The API refusing the engine's key (401), or what the key may do (403: no access to the model, say)."""
_NO_QUOTA: Final = "insufficient_quota"
"""The code of the 429 the API answers every request with while the key's account has no quota left (billing): a
refused key, not a rate limit that passes within seconds."""


class _KeyRefused(Exception):
    """The API refused the engine's key (`_KEY_REFUSED`, or a 429 `_NO_QUOTA`); the message says how."""


KEY_RETRY_INITIAL: Final = 60.0
"""Seconds, after the API refused the engine's key, before a caller's question is sent to it again (to learn whether
the key works now); each refusal of such a question doubles the wait."""
KEY_RETRY_MAX: Final = 600.0
"""The longest wait between two questions sent to learn whether a refused key works again (the ingestion worker
tries its passages at least as often)."""


class EmbeddingFailed(Exception):
    """The embedding provider gave no vectors (after the retries, for passages); the message says why."""


class EmbeddingRefused(EmbeddingFailed):
    """The embedding provider refused the texts themselves (HTTP 400 or 422); the message gives its reason."""


@dataclass(frozen=True, slots=True)
class EmbeddingSettings:
    """Which model embeds, how passages are batched and retried, and how long a question may take."""

    model: EmbeddingModel
    send_dimensions: bool = False
    """Ask the API for `model.dimensions` (text-embedding-3 models shorten their vectors on request)."""
    batch_size: int = 64
    max_attempts: int = 4
    retry_initial: float = 0.5
    """Seconds before the second attempt of a batch; each later one waits twice as long."""
    request_timeout: float = 30.0
    question_timeout: float = 0.25
    """Longest a caller's question waits for its embedding before the search goes on with full-text alone."""

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddingSettings | None:
        """The settings' embedding choice; None when DIALTONE_KB_EMBEDDING_MODEL is unset."""
        name = settings.kb_embedding_model
        if name is None:
            return None
        dimensions = settings.kb_embedding_dimensions or EMBEDDING_DIMENSIONS[name]
        return cls(
            model=EmbeddingModel(name, dimensions),
            send_dimensions=settings.kb_embedding_dimensions is not None,
            batch_size=settings.kb_embedding_batch_size,
            max_attempts=settings.kb_embedding_max_attempts,
            question_timeout=settings.kb_embedding_question_timeout,
        )


class OpenAIEmbedder:
    """Embeds texts with one OpenAI model through the SDK's async client (the engine's shared one)."""

    def __init__(
        self,
        client: AsyncOpenAI,
        settings: EmbeddingSettings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Embed through `client` as `settings` say; `sleep` waits between attempts and `clock` tells the time in
        seconds (tests pass their own)."""
        # Retries are ours (counted, with backoff, none for questions): the SDK's own are turned off.
        self._client = client.with_options(max_retries=0, timeout=settings.request_timeout)
        self.settings = settings
        self._sleep = sleep
        self._clock = clock
        self.key_refused: str | None = None
        """Why the API refused the engine's key, from its refusal until it takes a request again; None otherwise."""
        self._question_refusals = 0
        self._next_question_at = 0.0
        """While the key is refused: `clock` time before which no question is sent."""
        self._question_in_flight = False
        self._key_listeners: list[Callable[[], None]] = []

    def on_key_accepted(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever the API takes a request again after refusing the engine's key (the ingestion
        worker then embeds what waited without waiting out its backoff)."""
        self._key_listeners.append(listener)

    @property
    def model(self) -> EmbeddingModel:
        """The model and vector length the embeddings are made with."""
        return self.settings.model

    async def embed_passages(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order: a request per `batch_size` texts, each retried with backoff."""
        vectors: list[list[float]] = []
        size = self.settings.batch_size
        for start in range(0, len(texts), size):
            vectors += await self._with_retries(texts[start : start + size])
        return vectors

    async def embed_question(self, text: str) -> list[float]:
        """The vector of a caller's question: one attempt within `question_timeout` (TimeoutError past it).

        EmbeddingFailed at once, no request sent, while the API refuses the engine's key: but one question every
        `KEY_RETRY_INITIAL` (doubling up to `KEY_RETRY_MAX`) is sent, to learn whether it takes the key again.
        """
        refused = self.key_refused
        if refused is not None and (self._question_in_flight or self._clock() < self._next_question_at):
            raise EmbeddingFailed(f"{refused}; questions are not sent until it works")
        self._question_in_flight = refused is not None
        try:
            async with asyncio.timeout(self.settings.question_timeout):
                try:
                    return (await self._request([text]))[0]
                except _KeyRefused as exc:
                    self._question_refusals += 1
                    raise EmbeddingFailed(str(exc)) from None
                except openai.APIError as exc:
                    raise EmbeddingFailed(_describe(exc)) from None
        finally:
            self._question_in_flight = False
            if self.key_refused is not None:
                wait = min(KEY_RETRY_INITIAL * 2 ** max(self._question_refusals - 1, 0), KEY_RETRY_MAX)
                self._next_question_at = max(self._next_question_at, self._clock() + wait)

    async def _with_retries(self, batch: Sequence[str]) -> list[list[float]]:
        wait = self.settings.retry_initial
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                return await self._request(batch)
            except _RETRIED as exc:
                if attempt == self.settings.max_attempts:
                    raise EmbeddingFailed(f"{_describe(exc)}, after {attempt} attempts") from None
                log.info("embedding %d passages: %s; retry in %.1fs", len(batch), _describe(exc), wait)
                await self._sleep(wait)
                wait *= 2
            except _REFUSED as exc:
                raise EmbeddingRefused(_describe_refusal(exc)) from None
            except _KeyRefused as exc:
                raise EmbeddingFailed(f"{exc}; vectors resume once the key works") from None
            except openai.APIError as exc:
                raise EmbeddingFailed(_describe(exc)) from None
        raise AssertionError("unreachable: max_attempts is at least 1")

    async def _request(self, texts: Sequence[str]) -> list[list[float]]:
        model = self.settings.model
        try:
            if self.settings.send_dimensions:
                response = await self._client.embeddings.create(
                    model=model.name, input=list(texts), dimensions=model.dimensions
                )
            else:
                response = await self._client.embeddings.create(model=model.name, input=list(texts))
        except openai.APIStatusError as exc:
            if isinstance(exc, _KEY_REFUSED) or (isinstance(exc, openai.RateLimitError) and exc.code == _NO_QUOTA):
                self._refused(_describe(exc))
                raise _KeyRefused(_describe(exc)) from None
            raise
        self._accepted()
        if len(response.data) != len(texts):
            raise EmbeddingFailed(f"{model.name} returned {len(response.data)} embeddings for {len(texts)} texts")
        vectors = [list(item.embedding) for item in sorted(response.data, key=lambda item: item.index)]
        wrong = next((len(vector) for vector in vectors if len(vector) != model.dimensions), None)
        if wrong is not None:
            raise EmbeddingFailed(
                f"{model.name} returned vectors of {wrong} dimensions, not {model.dimensions} "
                "(check DIALTONE_KB_EMBEDDING_DIMENSIONS)"
            )
        return vectors

    def _refused(self, reason: str) -> None:
        if self.key_refused is None:
            log.warning("%s: callers' questions are searched by full-text alone until it works", reason)
            self._next_question_at = self._clock() + KEY_RETRY_INITIAL
        self.key_refused = reason

    def _accepted(self) -> None:
        if self.key_refused is None:
            return
        log.info("the embedding API takes the engine's key again: questions and passages are embedded again")
        self.key_refused = None
        self._question_refusals = 0
        for listener in self._key_listeners:
            listener()


def _describe(exc: openai.APIError) -> str:
    match exc:
        case openai.AuthenticationError() | openai.PermissionDeniedError():
            return f"the embedding API refused the engine's key (HTTP {exc.status_code})"
        case openai.RateLimitError(code=code) if code == _NO_QUOTA:
            return f"the embedding API refused the engine's key: its account has no quota left (HTTP 429 {_NO_QUOTA})"
        case openai.APIStatusError(status_code=status):
            return f"the embedding API answered HTTP {status}"
        case openai.APITimeoutError():
            return "the embedding API timed out"
        case _:
            return f"the embedding API could not be reached ({type(exc).__name__})"


def _describe_refusal(exc: openai.APIStatusError) -> str:
    reason = exc.body.get("message") if isinstance(exc.body, dict) else None
    return f"{_describe(exc)} ({reason})" if isinstance(reason, str) and reason else _describe(exc)


async def embedder_from_settings(settings: Settings, clients: ProviderClients, pool: Pool) -> OpenAIEmbedder | None:
    """The engine's embedder, or None (vector search off), saying in the log which and why."""
    chosen = EmbeddingSettings.from_settings(settings)
    if chosen is None:
        log.info("knowledge bases: vector search off (DIALTONE_KB_EMBEDDING_MODEL is unset); full-text search only")
        return None
    if not await vector_search_available(pool):
        log.warning(
            "knowledge bases: vector search off: the database has no pgvector (migration 0021 found no `vector` "
            "extension it could create); full-text search only"
        )
        return None
    try:
        key = provider_key(
            OpenAILLMConfig(model=chosen.model.name, api_key_ref=settings.kb_embedding_key_ref),
            ProviderKeys(settings, organization_id=None),  # an operator setting: shared variables only
            stage="llm",
        )
    except ProviderKeyMissing as exc:
        log.error("knowledge bases: vector search off: DIALTONE_KB_EMBEDDING_KEY_REF: %s", exc)
        return None
    log.info("knowledge bases: vector search on with %s (%d dimensions)", chosen.model.name, chosen.model.dimensions)
    return OpenAIEmbedder(clients.openai(key or "", settings.openai_base_url), chosen)


async def embed_pending_passages(pool: Pool, embedder: OpenAIEmbedder) -> int:
    """Embed every passage not yet embedded by the embedder's model, a batch per transaction; how many were (those
    deleted while their request ran are not counted).

    Each batch's passages stay claimed (`claim_pending`: advisory locks, which no change to their document waits
    for) while their request runs, so two processes never embed the same ones. EmbeddingFailed when a batch fails
    after its retries: its passages wait for the next try. A passage the API refuses on its own is set aside
    (`record_refusals`), so it never holds back the passages behind it, every organization's.
    """
    embedded = 0
    while True:
        async with transaction(pool) as conn:
            pending = await claim_pending(conn, model=embedder.model, limit=embedder.settings.batch_size)
            if not pending:
                return embedded
            vectors, refusals = await _embed_isolating_refusals(embedder, pending)
            if refusals and not vectors:
                # Every text refused, one by one: more likely a setting the API refuses (a `dimensions` the model
                # does not take) than the texts. They wait, as on any failure; a bad one alone waits for company.
                # The API's words stay in the log: they may quote passages, and the failure is told to every
                # organization whose passages wait.
                log.warning(
                    "the embedding API refused each of %d passages on its own, the first: %s",
                    len(refusals),
                    next(iter(refusals.values())),
                )
                raise EmbeddingFailed(
                    "the embedding API refused every passage of a batch, taken for a setting of the engine's it "
                    "refuses; vectors resume once it is changed"
                )
            stored = await store_embeddings(
                conn, model=embedder.model, chunk_ids=list(vectors), vectors=list(vectors.values())
            )
            await record_refusals(conn, model=embedder.model, refusals=refusals)
        for chunk_id, reason in refusals.items():
            log.warning("knowledge passage %s set aside: %s refused it: %s", chunk_id, embedder.model.name, reason)
        embedded += stored


async def _embed_isolating_refusals(
    embedder: OpenAIEmbedder, passages: Sequence[PendingPassage]
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """The passages' vectors and, for each one the API refuses on its own, why (both by chunk id).

    A refused batch is sent again in halves, and so on: a passage the API will never embed costs about two
    requests per halving, and no other passage its embedding.
    """
    try:
        vectors = await embedder.embed_passages([passage.content for passage in passages])
    except EmbeddingRefused as exc:
        if len(passages) == 1:
            return {}, {passages[0].chunk_id: str(exc)}
        half = len(passages) // 2
        first_vectors, first_refusals = await _embed_isolating_refusals(embedder, passages[:half])
        last_vectors, last_refusals = await _embed_isolating_refusals(embedder, passages[half:])
        return first_vectors | last_vectors, first_refusals | last_refusals
    return {passage.chunk_id: vector for passage, vector in zip(passages, vectors, strict=True)}, {}
