"""Which `DIALTONE_AGENT_KEY_*` variables an agent may spend: its own organization's, the shared ones, no other's."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from config.agent import OpenAILLMConfig, parse_agent_configuration
from config.settings import Settings, load_settings
from engine.call.setup import provider_keys
from engine.knowledge.embeddings import embedder_from_settings
from pipelines.clients import ProviderClients
from pipelines.errors import PipelineUnavailable, ProviderKeyMissing
from pipelines.registry import ProviderKeys, check_pipeline, provider_key
from storage import agents
from tests.test_api_auth import Api, Tenant, make_tenant

ACME = "clx7acme0000000000000000a"
GLOBEX = "clx7globex00000000000000b"
ACME_KEY = "sk-acme-own-account-0001"
SHARED_KEY = "sk-operator-shared-0002"


def resolve(variable: str, organization_id: str | None, environ: dict[str, str]) -> str | None:
    """The key an OpenAI model of `organization_id` reads from `env:<variable>`."""
    keys = ProviderKeys(
        load_settings(openai_api_key="sk-operator-default"), environ=environ, organization_id=organization_id
    )
    return provider_key(OpenAILLMConfig(api_key_ref=f"env:{variable}"), keys, stage="llm")


def refusal(variable: str, organization_id: str | None, environ: dict[str, str]) -> str:
    with pytest.raises(ProviderKeyMissing) as refused:
        resolve(variable, organization_id, environ)
    return str(refused.value)


def test_an_organizations_own_variable_is_its_agents_key() -> None:
    environ = {f"DIALTONE_AGENT_KEY_{ACME}_OPENAI": ACME_KEY}
    assert resolve(f"DIALTONE_AGENT_KEY_{ACME}_OPENAI", ACME, environ) == ACME_KEY


def test_another_organizations_variable_is_refused_naming_the_allowed_forms_not_the_key() -> None:
    environ = {f"DIALTONE_AGENT_KEY_{ACME}_OPENAI": ACME_KEY}
    message = refusal(f"DIALTONE_AGENT_KEY_{ACME}_OPENAI", GLOBEX, environ)
    assert message == (
        f"openai: DIALTONE_AGENT_KEY_{ACME}_OPENAI is not a key this organization's agents may use: name it "
        f"DIALTONE_AGENT_KEY_{GLOBEX}_<NAME> (this organization's own) or DIALTONE_AGENT_KEY_SHARED_<NAME> "
        "(the operator's, shared with every organization)"
    )
    assert ACME_KEY not in message


def test_the_organization_id_is_compared_exactly() -> None:
    environ = {
        f"DIALTONE_AGENT_KEY_{ACME.upper()}_OPENAI": ACME_KEY,
        f"DIALTONE_AGENT_KEY_{ACME}x_OPENAI": ACME_KEY,
        f"DIALTONE_AGENT_KEY_{ACME[:-1]}_OPENAI": ACME_KEY,
    }
    for variable in environ:
        assert "is not a key this organization's agents may use" in refusal(variable, ACME, environ)


def test_a_shared_variable_is_every_organizations_key() -> None:
    environ = {"DIALTONE_AGENT_KEY_SHARED_OPENAI": SHARED_KEY}
    for organization_id in (ACME, GLOBEX):
        assert resolve("DIALTONE_AGENT_KEY_SHARED_OPENAI", organization_id, environ) == SHARED_KEY


def test_a_variable_tied_to_no_organization_is_refused_even_when_set() -> None:
    environ = {"DIALTONE_AGENT_KEY_FOO": SHARED_KEY, "DIALTONE_AGENT_KEY_SHARED_": SHARED_KEY}
    for variable in environ:
        message = refusal(variable, ACME, environ)
        assert f"DIALTONE_AGENT_KEY_{ACME}_<NAME>" in message and "DIALTONE_AGENT_KEY_SHARED_<NAME>" in message
        assert SHARED_KEY not in message


def test_a_variable_that_is_no_key_at_all_is_refused_naming_every_allowed_form() -> None:
    message = refusal("DATABASE_URL", ACME, {"DATABASE_URL": "postgresql://secret@db/dialtone"})
    assert message == (
        "openai: DATABASE_URL is not a key setting: use DEEPGRAM_API_KEY, OPENAI_API_KEY, ELEVENLABS_API_KEY, or a "
        f"variable named DIALTONE_AGENT_KEY_{ACME}_<NAME> (this organization's own) or "
        "DIALTONE_AGENT_KEY_SHARED_<NAME> (the operator's, shared with every organization)"
    )


def test_an_organization_whose_id_cannot_be_part_of_a_name_has_no_own_variables() -> None:
    environ = {"DIALTONE_AGENT_KEY_org_OPENAI": ACME_KEY}
    message = refusal("DIALTONE_AGENT_KEY_org_OPENAI", "org_demo", environ)  # "org" is not "org_demo"
    assert "organization org_demo has no own variables" in message
    assert "DIALTONE_AGENT_KEY_org_demo_<NAME>" not in message


def test_the_engines_own_settings_may_use_shared_variables_and_the_provider_settings() -> None:
    environ = {"DIALTONE_AGENT_KEY_SHARED_EMBEDDINGS": SHARED_KEY}
    assert resolve("DIALTONE_AGENT_KEY_SHARED_EMBEDDINGS", None, environ) == SHARED_KEY
    assert resolve("OPENAI_API_KEY", None, environ) == "sk-operator-default"


def test_the_engines_own_settings_may_not_spend_one_organizations_key() -> None:
    environ = {f"DIALTONE_AGENT_KEY_{ACME}_OPENAI": ACME_KEY}
    message = refusal(f"DIALTONE_AGENT_KEY_{ACME}_OPENAI", None, environ)
    assert message == (
        f"openai: DIALTONE_AGENT_KEY_{ACME}_OPENAI is not a key the engine's own settings may use: name it "
        "DIALTONE_AGENT_KEY_SHARED_<NAME> (the operator's, shared with every organization); one organization's "
        "variable is not for the engine's own settings"
    )


# Through the parts a call and the API use: agents in the database, the keys of their bundle, the /v1 server.


@pytest.fixture(scope="module")
async def acme(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Acme")


@pytest.fixture(scope="module")
async def globex(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Globex")


async def test_a_call_of_another_organizations_agent_cannot_run_on_acmes_key(
    pool: asyncpg.Pool, acme: Tenant, globex: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable = f"DIALTONE_AGENT_KEY_{acme.organization_id}_OPENAI"
    monkeypatch.setenv(variable, ACME_KEY)
    configuration = {"llm": {"provider": "openai", "api_key_ref": f"env:{variable}"}}
    # Stored as an agent saved before the rule would be: the call path refuses it on its own.
    own = await agents.create_agent(pool, organization_id=acme.organization_id, name="Own", configuration=configuration)
    thief = await agents.create_agent(
        pool, organization_id=globex.organization_id, name="Thief", configuration=configuration
    )
    settings = load_settings()

    own_bundle = await agents.load_agent_bundle(pool, organization_id=acme.organization_id, agent_id=own.id)
    check_pipeline(parse_agent_configuration(own.configuration), provider_keys(settings, own_bundle))
    thief_bundle = await agents.load_agent_bundle(pool, organization_id=globex.organization_id, agent_id=thief.id)
    with pytest.raises(PipelineUnavailable) as refused:
        check_pipeline(parse_agent_configuration(thief.configuration), provider_keys(settings, thief_bundle))
    assert f"llm: openai: {variable} is not a key this organization's agents may use" in str(refused.value)
    assert ACME_KEY not in str(refused.value)


async def test_an_agent_naming_another_organizations_variable_is_not_saved(
    api: Api, acme: Tenant, globex: Tenant
) -> None:
    foreign = f"env:DIALTONE_AGENT_KEY_{acme.organization_id}_OPENAI"
    llm = [{"provider": "openai", "api_key_ref": f"env:DIALTONE_AGENT_KEY_{globex.organization_id}_OPENAI"}]
    status, agent = await api.call(
        "POST", "/agents", globex.owner_key, json={"name": "Own keys", "configuration": {"llm": llm}}
    )
    assert status == 201  # its own variable, set or not yet
    llm.append({"provider": "openai", "api_key_ref": foreign})
    for method, path in (("POST", "/agents"), ("PATCH", f"/agents/{agent['id']}")):
        status, body = await api.call(
            method, path, globex.owner_key, json={"name": "Thief", "configuration": {"llm": llm}}
        )
        assert (status, body["error"]["field"]) == (422, "configuration.llm[1].api_key_ref")
        assert f"DIALTONE_AGENT_KEY_{globex.organization_id}_<NAME>" in body["error"]["message"]
        assert "DIALTONE_AGENT_KEY_SHARED_<NAME>" in body["error"]["message"]
    _, kept = await api.call("GET", f"/agents/{agent['id']}", globex.owner_key)
    assert [option["api_key_ref"] for option in kept["configuration"]["llm"]] == [llm[0]["api_key_ref"]]


async def test_the_embedding_setting_spends_a_shared_key_never_one_organizations(
    pool: asyncpg.Pool,
    acme: Tenant,
    provider_clients: ProviderClients,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    acmes = f"DIALTONE_AGENT_KEY_{acme.organization_id}_OPENAI"
    monkeypatch.setenv(acmes, ACME_KEY)
    monkeypatch.setenv("DIALTONE_AGENT_KEY_SHARED_EMBEDDINGS", SHARED_KEY)
    model = "text-embedding-3-small"

    shared = Settings(kb_embedding_model=model, kb_embedding_key_ref="env:DIALTONE_AGENT_KEY_SHARED_EMBEDDINGS")
    assert await embedder_from_settings(shared, provider_clients, pool) is not None
    with caplog.at_level(logging.INFO, logger="engine.knowledge.embeddings"):
        one_organizations = Settings(kb_embedding_model=model, kb_embedding_key_ref=f"env:{acmes}")
        assert await embedder_from_settings(one_organizations, provider_clients, pool) is None
    assert f"vector search off: DIALTONE_KB_EMBEDDING_KEY_REF: openai: {acmes} is not a key" in caplog.text
    assert ACME_KEY not in caplog.text
