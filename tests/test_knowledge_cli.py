"""`dialtone kb ...` as an operator runs it: a real process on a real database, ingesting with a progress bar."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
from openai import AsyncOpenAI

from storage import knowledge_bases
from tests.fakes.openai_chat import FakeOpenAI
from tests.knowledge_files import docx_file, pdf
from tests.test_campaign_cli import dialtone
from tests.test_knowledge_vectors import MODEL, carpark_documents, embedder, ingest
from tests.test_repo_agents import insert_organization


async def test_add_files_and_text_then_search(pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    org = await insert_organization(pool)
    slug = await pool.fetchval('SELECT "slug" FROM "Organization" WHERE "id" = $1', org)
    kb = await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="CLI")
    (tmp_path / "prices.pdf").write_bytes(pdf("The Beryl plan costs 12 dollars."))
    (tmp_path / "hours.docx").write_bytes(docx_file("The Beryl desk opens at eight."))
    code, out, err = await dialtone(
        db_url, tmp_path, "kb", "add-file", "--org", slug, "--kb", kb.id, "prices.pdf", "hours.docx"
    )
    assert code == 0, err
    assert "prices.pdf" in out and "hours.docx" in out
    assert "ingesting [" in err and "2/2" in err
    code, out, err = await dialtone(
        db_url, tmp_path, "kb", "add-text", "--org", org, "--kb", kb.id, "--name", "Note", "Beryl parking is free."
    )
    assert code == 0, err
    code, out, err = await dialtone(db_url, tmp_path, "kb", "search", "--org", org, "--kb", kb.id, "beryl plan cost")
    assert code == 0, err
    assert "12 dollars" in out.splitlines()[1]
    documents = await knowledge_bases.list_documents(pool, organization_id=org, knowledge_base_id=kb.id)
    assert sorted((d.name, d.status) for d in documents) == [
        ("Note", "READY"), ("hours.docx", "READY"), ("prices.pdf", "READY")
    ]  # fmt: skip


async def test_bad_input_is_one_line_and_adds_nothing(pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    org = await insert_organization(pool)
    kb = await knowledge_bases.create_knowledge_base(pool, organization_id=org, name="CLI errors")
    (tmp_path / "ok.txt").write_text("Fine text.")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
    code, _, err = await dialtone(
        db_url, tmp_path, "kb", "add-file", "--org", org, "--kb", kb.id, "ok.txt", "photo.png"
    )
    assert code == 1
    assert err.startswith("dialtone: photo.png") and "image/png" in err
    assert await knowledge_bases.list_documents(pool, organization_id=org, knowledge_base_id=kb.id) == []
    code, _, err = await dialtone(db_url, tmp_path, "kb", "search", "--org", org, "--kb", "nope", "x")
    assert code == 1 and "not found" in err


def documents_shown(out: str) -> list[str]:
    """The document ids of the passages `kb search` printed, in its order."""
    return re.findall(r"\((\w+), chunk \d+\)", out)


async def test_search_finds_passages_as_calls_do_by_vector_too_when_configured(
    pool: asyncpg.Pool, db_url: str, tmp_path: Path
) -> None:
    org = await insert_organization(pool)
    kb, ids = await carpark_documents(pool, org)
    question = "what are the carpark fees at the museum"
    async with FakeOpenAI(api_key="sk-embed") as fake:
        client = AsyncOpenAI(api_key="sk-embed", base_url=fake.base_url)
        await ingest(pool, embedder(client))
        await client.close()
        code, out, err = await dialtone(db_url, tmp_path, "kb", "search", "--org", org, "--kb", kb, question)
        assert code == 0, err
        assert "search by full-text\n" in err
        assert documents_shown(out) == [ids[0], ids[1]]  # "carpark" is no word of theirs
        code, out, err = await dialtone(
            db_url, tmp_path, "kb", "search", "--org", org, "--kb", kb, "--limit", "3", question,
            DIALTONE_KB_EMBEDDING_MODEL=MODEL.name, DIALTONE_KB_EMBEDDING_DIMENSIONS=str(MODEL.dimensions),
            DIALTONE_KB_EMBEDDING_QUESTION_TIMEOUT="10", OPENAI_API_KEY="sk-embed", OPENAI_BASE_URL=fake.base_url,
        )  # fmt: skip
        assert code == 0, err
        assert "search by full-text and vector" in err
        shown = documents_shown(out)
        assert shown[0] == ids[1] and ids[2] in shown  # fused: near the top of both; found by vector alone
        assert fake.embedding_requests[-1]["input"] == [question]
