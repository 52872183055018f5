"""/v1/knowledge-bases: named sets of documents agents look things up in, and their documents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeVar

from pydantic import ConfigDict, Field, model_validator

from engine.api.errors import ApiError
from engine.api.models import LongText, Name, RequestModel, ResponseModel, ShortText, UpdateModel, Url
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from engine.api.uploads import read_upload
from engine.knowledge.extract import sniff_mime_type
from engine.knowledge.ingestion import INGESTION_WORKER, KNOWLEDGE_EMBEDDER
from engine.knowledge.lookup import KnowledgeLookup
from engine.knowledge.unreadable import UnreadableDocument
from engine.server.appkeys import DATABASE, SETTINGS
from pipelines.knowledge import KnowledgeUnavailable
from storage import knowledge_bases
from storage.enums import DocumentType
from storage.knowledge_bases import DocumentLimitReached, KnowledgeBase, KnowledgeBaseDocument
from storage.knowledge_embeddings import EmbeddingProgress, embedding_failure, embedding_progress
from storage.knowledge_search import Passage
from storage.records import Connection

resource = Resource("Knowledge bases", "Documents (files, web pages, texts) agents may look things up in.")


SearchLanguage = Literal[
    "simple", "arabic", "danish", "dutch", "english", "finnish", "french", "german", "greek", "hungarian",
    "indonesian", "irish", "italian", "lithuanian", "nepali", "norwegian", "portuguese", "romanian", "russian",
    "spanish", "swedish", "tamil", "turkish",
]  # fmt: skip
"""PostgreSQL's text-search configurations: how a knowledge base's words are stemmed and which are stop words."""


class VectorProgress(ResponseModel):
    """How far vector search has come with the passages: those without an embedding yet are found by full-text
    search alone meanwhile."""

    status: Literal["EMBEDDING", "WAITING", "READY"] = Field(
        description="READY: every passage has its embedding (but those the model refused, named in their document's "
        "`error`); EMBEDDING: some are being embedded; WAITING: the embedding API fails (`reason` says why) and they "
        "are embedded once it works, nothing to upload again."
    )
    waiting_passages: int = Field(description="Passages without an embedding yet.")
    reason: str | None = Field(
        description="Why they wait (WAITING), e.g. the embedding API refusing the engine's key; null otherwise."
    )

    @classmethod
    def of(cls, progress: EmbeddingProgress, failure: str | None) -> VectorProgress:
        """The progress of passages, with `failure` the reason the engine's last round of embedding failed."""
        if not progress.waiting:
            return cls(status="READY", waiting_passages=0, reason=None)
        if failure is None:
            return cls(status="EMBEDDING", waiting_passages=progress.waiting, reason=None)
        return cls(status="WAITING", waiting_passages=progress.waiting, reason=failure)


_VECTORS_DESCRIPTION = (
    "How far vector search has come with its passages; null when the engine searches by full-text alone "
    "(no DIALTONE_KB_EMBEDDING_MODEL) or no passage has been read yet."
)


class KnowledgeBaseView(KnowledgeBase):
    """A knowledge base with how far its passages' embeddings have come."""

    vectors: VectorProgress | None = Field(description=_VECTORS_DESCRIPTION)


class DocumentView(KnowledgeBaseDocument):
    """A document with how far its passages' embeddings have come."""

    vectors: VectorProgress | None = Field(description=_VECTORS_DESCRIPTION)


View = TypeVar("View", KnowledgeBaseView, DocumentView)


async def _vector_progress(
    call: ApiCall, db: Connection, view: type[View], records: Sequence[KnowledgeBase | KnowledgeBaseDocument]
) -> dict[str, EmbeddingProgress]:
    """How far the records' passages are towards their embeddings (by record id), read in the organization's `db`;
    empty with vector search off."""
    embedder = call.app.get(KNOWLEDGE_EMBEDDER)
    if embedder is None or not records:
        return {}
    return await embedding_progress(
        db,
        organization_id=call.caller.organization_id,
        model=embedder.model,
        by="knowledgeBaseId" if view is KnowledgeBaseView else "documentId",
        ids=[record.id for record in records],
    )


async def _with_vectors(
    call: ApiCall,
    view: type[View],
    records: Sequence[KnowledgeBase | KnowledgeBaseDocument],
    progress: dict[str, EmbeddingProgress],
) -> list[View]:
    """The records as `view`s with their `progress` (`_vector_progress`) and, where passages wait, why.

    Why is whichever engine's last failed round said (storage.knowledge_embeddings.embedding_failure), read once the
    organization's transaction is over: an engine table, out of the API role's reach, read on the engine's own
    connection (never a second one held at once).
    """
    embedder = call.app.get(KNOWLEDGE_EMBEDDER)
    failure = None
    if embedder is not None and any(found.waiting for found in progress.values()):
        failure = await embedding_failure(call.app[DATABASE].pool, model=embedder.model)
    return [
        view(
            **record.model_dump(),
            vectors=VectorProgress.of(progress[record.id], failure) if record.id in progress else None,
        )
        for record in records
    ]


class KnowledgeBaseCreate(RequestModel):
    """A new, empty knowledge base; `language` is how its text is searched ('simple': no stemming)."""

    name: Name
    description: LongText | None = None
    language: SearchLanguage = "english"


class KnowledgeBaseUpdate(UpdateModel):
    """Fields to change; null clears the description."""

    not_null = frozenset({"name"})

    name: Name | None = None
    description: LongText | None = None


class DocumentCreate(RequestModel):
    """A document: a TEXT carries its `content`, a WEBSITE its `url`, a FILE where it is stored."""

    # The same rule as `_source` below, for the document's readers (and generators of test data).
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"type": {"const": "TEXT"}}},
            "then": {"required": ["content"], "properties": {"content": {"type": "string"}}},
            "else": {"required": ["url"], "properties": {"url": {"type": "string"}}},
        }
    )

    name: Name
    type: DocumentType
    url: Url | None = None
    content: LongText | None = None
    file_size: int | None = Field(None, ge=0, le=2_147_483_647)
    mime_type: ShortText | None = None

    @model_validator(mode="after")
    def _source(self) -> DocumentCreate:
        if self.type is DocumentType.FILE:
            raise ValueError("upload a FILE document's bytes to POST /knowledge-bases/{knowledgeBaseId}/files")
        if self.type is DocumentType.TEXT and self.content is None:
            raise ValueError("a TEXT document needs its content")
        if self.type is not DocumentType.TEXT and self.url is None:
            raise ValueError(f"a {self.type} document needs its url")
        return self


@resource.get("/knowledge-bases", summary="List knowledge bases", response=Page[KnowledgeBaseView], query=PageQuery)
async def list_knowledge_bases(call: ApiCall) -> Page[KnowledgeBaseView]:
    """The organization's knowledge bases, newest first."""
    query = call.query_as(PageQuery)
    async with call.tenant() as db:
        rows = await knowledge_bases.list_knowledge_bases_page(
            db, organization_id=call.caller.organization_id, limit=query.fetch_limit, before=query.position()
        )
        progress = await _vector_progress(call, db, KnowledgeBaseView, rows)
    return to_page(Page[KnowledgeBaseView], await _with_vectors(call, KnowledgeBaseView, rows, progress), query)


@resource.post(
    "/knowledge-bases", summary="Create a knowledge base", response=KnowledgeBaseView, body=KnowledgeBaseCreate
)
async def create_knowledge_base(call: ApiCall) -> KnowledgeBaseView:
    """Create an empty knowledge base."""
    body = call.body_as(KnowledgeBaseCreate)
    async with call.tenant() as db:
        created = await knowledge_bases.create_knowledge_base(
            db,
            organization_id=call.caller.organization_id,
            name=body.name,
            description=body.description,
            language=body.language,
        )
    return KnowledgeBaseView(**created.model_dump(), vectors=None)  # no passage yet


@resource.get("/knowledge-bases/{knowledgeBaseId}", summary="Get a knowledge base", response=KnowledgeBaseView)
async def get_knowledge_base(call: ApiCall) -> KnowledgeBaseView:
    """One knowledge base, with the count of each kind of document in it and how far its vectors have come."""
    async with call.tenant() as db:
        found = await knowledge_bases.get_knowledge_base(
            db, organization_id=call.caller.organization_id, knowledge_base_id=call.path["knowledgeBaseId"]
        )
        progress = await _vector_progress(call, db, KnowledgeBaseView, [found])
    return (await _with_vectors(call, KnowledgeBaseView, [found], progress))[0]


@resource.patch(
    "/knowledge-bases/{knowledgeBaseId}",
    summary="Update a knowledge base",
    response=KnowledgeBaseView,
    body=KnowledgeBaseUpdate,
)
async def update_knowledge_base(call: ApiCall) -> KnowledgeBaseView:
    """Rename a knowledge base or change its description."""
    changes = call.body_as(KnowledgeBaseUpdate).changes()
    async with call.tenant() as db:
        updated = await knowledge_bases.update_knowledge_base(
            db,
            organization_id=call.caller.organization_id,
            knowledge_base_id=call.path["knowledgeBaseId"],
            changes=changes,
        )
        progress = await _vector_progress(call, db, KnowledgeBaseView, [updated])
    return (await _with_vectors(call, KnowledgeBaseView, [updated], progress))[0]


@resource.delete("/knowledge-bases/{knowledgeBaseId}", summary="Delete a knowledge base")
async def delete_knowledge_base(call: ApiCall) -> None:
    """Delete a knowledge base and its documents; agents that used it lose it."""
    async with call.tenant() as db:
        await knowledge_bases.delete_knowledge_base(
            db, organization_id=call.caller.organization_id, knowledge_base_id=call.path["knowledgeBaseId"]
        )


@resource.get(
    "/knowledge-bases/{knowledgeBaseId}/documents",
    summary="List a knowledge base's documents",
    response=Page[DocumentView],
    query=PageQuery,
)
async def list_documents(call: ApiCall) -> Page[DocumentView]:
    """The knowledge base's documents, newest first."""
    query = call.query_as(PageQuery)
    async with call.tenant() as db:
        # 404 for a knowledge base that is not the organization's, rather than an empty list.
        await knowledge_bases.get_knowledge_base(
            db, organization_id=call.caller.organization_id, knowledge_base_id=call.path["knowledgeBaseId"]
        )
        rows = await knowledge_bases.list_documents_page(
            db,
            organization_id=call.caller.organization_id,
            knowledge_base_id=call.path["knowledgeBaseId"],
            limit=query.fetch_limit,
            before=query.position(),
        )
        progress = await _vector_progress(call, db, DocumentView, rows)
    return to_page(Page[DocumentView], await _with_vectors(call, DocumentView, rows, progress), query)


def _queued(call: ApiCall) -> None:
    worker = call.app.get(INGESTION_WORKER)
    if worker is not None:  # other engine processes find the document on their next poll
        worker.wake()


def _limit_reached(exc: DocumentLimitReached) -> ApiError:
    return ApiError(409, "document_limit", str(exc))


@resource.post(
    "/knowledge-bases/{knowledgeBaseId}/documents",
    summary="Add a web page or a text",
    response=DocumentView,
    body=DocumentCreate,
    errors=(409,),
)
async def add_document(call: ApiCall) -> DocumentView:
    """Add a WEBSITE (crawled from its url) or a TEXT; it is PROCESSING until ingested, then READY or ERROR.

    409 `document_limit` when the knowledge base already holds 100 documents. Files go to the files endpoint.
    """
    body = call.body_as(DocumentCreate)
    try:
        async with call.tenant() as db:
            document = await knowledge_bases.add_document(
                db,
                organization_id=call.caller.organization_id,
                knowledge_base_id=call.path["knowledgeBaseId"],
                **body.model_dump(),
            )
    except DocumentLimitReached as exc:
        raise _limit_reached(exc) from None
    _queued(call)
    return DocumentView(**document.model_dump(), vectors=None)  # no passage yet


class FileForm(RequestModel):
    """An uploaded file's form fields beside its `file`: the document's name (default: the file's name)."""

    name: Name | None = None


@resource.post(
    "/knowledge-bases/{knowledgeBaseId}/files",
    summary="Upload a file",
    response=DocumentView,
    form=FileForm,
    errors=(409,),
)
async def upload_file(call: ApiCall) -> DocumentView:
    """Upload a PDF, DOCX, HTML, CSV, Markdown or text file (multipart/form-data, its bytes in `file`).

    Its type and size are read from the bytes. 413 past DIALTONE_KB_MAX_FILE_BYTES, 422 for a type not
    supported, 409 `document_limit` when the knowledge base already holds 100 documents.
    """
    settings = call.app[SETTINGS]
    async with call.tenant() as db:  # 404 before reading a body meant for a knowledge base that is not there
        await knowledge_bases.get_knowledge_base(
            db, organization_id=call.caller.organization_id, knowledge_base_id=call.path["knowledgeBaseId"]
        )
    form, upload = await read_upload(
        call.request, FileForm, max_bytes=settings.kb_max_file_bytes, limit_name="DIALTONE_KB_MAX_FILE_BYTES"
    )
    if not upload.data:
        raise ApiError(422, "validation_error", "the file is empty", "file")
    try:
        mime_type = sniff_mime_type(upload.data, name=upload.filename)
    except UnreadableDocument as exc:
        raise ApiError(422, "unsupported_file", str(exc), "file") from None
    try:
        async with call.tenant() as db:
            document = await knowledge_bases.add_document(
                db,
                organization_id=call.caller.organization_id,
                knowledge_base_id=call.path["knowledgeBaseId"],
                name=form.name or upload.filename[:200] or "upload",
                type=DocumentType.FILE,
                file_size=len(upload.data),
                mime_type=mime_type,
                data=upload.data,
            )
    except DocumentLimitReached as exc:
        raise _limit_reached(exc) from None
    _queued(call)
    return DocumentView(**document.model_dump(), vectors=None)  # no passage yet


@resource.get(
    "/knowledge-bases/{knowledgeBaseId}/documents/{documentId}",
    summary="Get a document",
    response=DocumentView,
)
async def get_document(call: ApiCall) -> DocumentView:
    """One document: its status (PROCESSING, READY, ERROR) and, in ERROR, why; how far its vectors have come, and
    why they wait when they do."""
    async with call.tenant() as db:
        document = await knowledge_bases.get_document(
            db,
            organization_id=call.caller.organization_id,
            knowledge_base_id=call.path["knowledgeBaseId"],
            document_id=call.path["documentId"],
        )
        progress = await _vector_progress(call, db, DocumentView, [document])
    return (await _with_vectors(call, DocumentView, [document], progress))[0]


@resource.post(
    "/knowledge-bases/{knowledgeBaseId}/documents/{documentId}/reingest",
    summary="Re-crawl or re-read a document",
    response=DocumentView,
    status=200,
)
async def reingest_document(call: ApiCall) -> DocumentView:
    """Read the document again (a website is re-crawled); its passages stay searchable until replaced."""
    async with call.tenant() as db:
        document = await knowledge_bases.reingest_document(
            db,
            organization_id=call.caller.organization_id,
            knowledge_base_id=call.path["knowledgeBaseId"],
            document_id=call.path["documentId"],
        )
        progress = await _vector_progress(call, db, DocumentView, [document])
    _queued(call)
    return (await _with_vectors(call, DocumentView, [document], progress))[0]


QUESTION_MAX_LENGTH = 2000
"""Longest question searched: a caller's turn is far shorter, and a query string must fit the request line the
server reads (aiohttp refuses one over 8,190 bytes before the API sees it, URL-encoding included)."""


class SearchQuery(RequestModel):
    """A question to find passages for, and how many to return."""

    # Checked by the handler, after the knowledge base is known to be the caller's (404 comes first).
    q: LongText | None = Field(
        None, min_length=1, max_length=QUESTION_MAX_LENGTH, description="The question or words to look for (required)."
    )
    limit: int = Field(5, ge=1, le=50, description="How many passages to return (1-50).")


class SearchResults(ResponseModel):
    """Passages ranked best first, with the document and chunk each comes from."""

    data: list[Passage]


@resource.get(
    "/knowledge-bases/{knowledgeBaseId}/search",
    summary="Search a knowledge base",
    response=SearchResults,
    query=SearchQuery,
)
async def search_knowledge_base(call: ApiCall) -> SearchResults:
    """The passages that best answer `q`, best first, found as a call finds them: full-text search in the knowledge
    base's language, fused with vector search when the engine has an embedding model.

    503 `unavailable` when the database cannot serve the search (unreachable, or slower than a call would wait for
    it), rather than an empty list that would say nothing matches.
    """
    query = call.query_as(SearchQuery)
    async with call.tenant() as db:
        knowledge_base = await knowledge_bases.get_knowledge_base(
            db, organization_id=call.caller.organization_id, knowledge_base_id=call.path["knowledgeBaseId"]
        )
    if query.q is None:
        raise ApiError(422, "validation_error", "query q: is required", "q")
    lookup = KnowledgeLookup(
        call.app[DATABASE].pool,
        organization_id=call.caller.organization_id,
        knowledge_base_ids=[knowledge_base.id],
        limit=query.limit,
        embedder=call.app.get(KNOWLEDGE_EMBEDDER),
    )
    try:
        return SearchResults(data=await lookup.passages(query.q))
    except KnowledgeUnavailable as exc:
        raise ApiError(
            503, "unavailable", f"the knowledge base cannot be searched right now: {exc}; try again"
        ) from None


@resource.delete("/knowledge-bases/{knowledgeBaseId}/documents/{documentId}", summary="Delete a document")
async def delete_document(call: ApiCall) -> None:
    """Remove a document, its passages and its file, and uncount it from its knowledge base."""
    async with call.tenant() as db:
        await knowledge_bases.delete_document(
            db,
            organization_id=call.caller.organization_id,
            knowledge_base_id=call.path["knowledgeBaseId"],
            document_id=call.path["documentId"],
        )
