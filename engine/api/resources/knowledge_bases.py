"""/v1/knowledge-bases: named sets of documents agents look things up in, and their documents."""

from __future__ import annotations

from pydantic import ConfigDict, Field, model_validator

from engine.api.models import LongText, Name, RequestModel, ShortText, UpdateModel, Url
from engine.api.operations import ApiCall, Resource
from engine.api.pagination import Page, PageQuery, to_page
from storage import knowledge_bases
from storage.enums import DocumentType
from storage.knowledge_bases import KnowledgeBase, KnowledgeBaseDocument

resource = Resource("Knowledge bases", "Documents (files, web pages, texts) agents may look things up in.")


class KnowledgeBaseCreate(RequestModel):
    """A new, empty knowledge base."""

    name: Name
    description: LongText | None = None


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
        if self.type is DocumentType.TEXT and self.content is None:
            raise ValueError("a TEXT document needs its content")
        if self.type is not DocumentType.TEXT and self.url is None:
            raise ValueError(f"a {self.type} document needs its url")
        return self


@resource.get("/knowledge-bases", summary="List knowledge bases", response=Page[KnowledgeBase], query=PageQuery)
async def list_knowledge_bases(call: ApiCall) -> Page[KnowledgeBase]:
    """The organization's knowledge bases, newest first."""
    query = call.query_as(PageQuery)
    async with call.tenant() as db:
        rows = await knowledge_bases.list_knowledge_bases_page(
            db, organization_id=call.caller.organization_id, limit=query.fetch_limit, before=query.position()
        )
    return to_page(Page[KnowledgeBase], rows, query)


@resource.post("/knowledge-bases", summary="Create a knowledge base", response=KnowledgeBase, body=KnowledgeBaseCreate)
async def create_knowledge_base(call: ApiCall) -> KnowledgeBase:
    """Create an empty knowledge base."""
    body = call.body_as(KnowledgeBaseCreate)
    async with call.tenant() as db:
        return await knowledge_bases.create_knowledge_base(
            db, organization_id=call.caller.organization_id, name=body.name, description=body.description
        )


@resource.get("/knowledge-bases/{knowledgeBaseId}", summary="Get a knowledge base", response=KnowledgeBase)
async def get_knowledge_base(call: ApiCall) -> KnowledgeBase:
    """One knowledge base, with the count of each kind of document in it."""
    async with call.tenant() as db:
        return await knowledge_bases.get_knowledge_base(
            db, organization_id=call.caller.organization_id, knowledge_base_id=call.path["knowledgeBaseId"]
        )


@resource.patch(
    "/knowledge-bases/{knowledgeBaseId}",
    summary="Update a knowledge base",
    response=KnowledgeBase,
    body=KnowledgeBaseUpdate,
)
async def update_knowledge_base(call: ApiCall) -> KnowledgeBase:
    """Rename a knowledge base or change its description."""
    changes = call.body_as(KnowledgeBaseUpdate).changes()
    async with call.tenant() as db:
        return await knowledge_bases.update_knowledge_base(
            db,
            organization_id=call.caller.organization_id,
            knowledge_base_id=call.path["knowledgeBaseId"],
            changes=changes,
        )


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
    response=Page[KnowledgeBaseDocument],
    query=PageQuery,
)
async def list_documents(call: ApiCall) -> Page[KnowledgeBaseDocument]:
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
    return to_page(Page[KnowledgeBaseDocument], rows, query)


@resource.post(
    "/knowledge-bases/{knowledgeBaseId}/documents",
    summary="Add a document",
    response=KnowledgeBaseDocument,
    body=DocumentCreate,
)
async def add_document(call: ApiCall) -> KnowledgeBaseDocument:
    """Add a document (PROCESSING until ingested) and count it in its knowledge base."""
    body = call.body_as(DocumentCreate)
    async with call.tenant() as db:
        return await knowledge_bases.add_document(
            db,
            organization_id=call.caller.organization_id,
            knowledge_base_id=call.path["knowledgeBaseId"],
            **body.model_dump(),
        )


@resource.delete("/knowledge-bases/{knowledgeBaseId}/documents/{documentId}", summary="Delete a document")
async def delete_document(call: ApiCall) -> None:
    """Remove a document and uncount it from its knowledge base."""
    async with call.tenant() as db:
        await knowledge_bases.delete_document(
            db,
            organization_id=call.caller.organization_id,
            knowledge_base_id=call.path["knowledgeBaseId"],
            document_id=call.path["documentId"],
        )
