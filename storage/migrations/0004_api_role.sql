-- 0004: the database role the platform API works as. It is neither superuser nor BYPASSRLS, so the
-- row-level security policies on tenant tables apply to every query the API makes. The engine's own
-- connections keep the owner's role (calls, dispatch and webhook delivery work across organizations).
-- API transactions switch to this role with SET LOCAL ROLE and name their organization with
-- set_config('app.organization_id', ..., true); see storage/tenancy.py. Roles are cluster-wide: several
-- databases on one server (tests, staging) share it, and two migrating at once must not collide.

DO $$
BEGIN
    CREATE ROLE dialtone_api NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

-- The migrating (owner) role may switch to it.
DO $$
BEGIN
    EXECUTE format('GRANT dialtone_api TO %I', current_user);
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

GRANT USAGE ON SCHEMA public TO dialtone_api;
