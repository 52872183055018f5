-- 0024: the default caller id, one rule in one home. A call placed without a number to call from (POST /v1/calls
-- without "fromNumber", a campaign without its own) calls from its agent's number when that one may call out, else
-- from the organization's first number that may (oldest "createdAt", then "id"); NULL when the organization has
-- none. The campaign dispatcher's claim query and the API's calls (storage/phone_numbers.py, default_caller_id)
-- both ask this function, so they cannot choose differently.
--
-- Only numbers and an agent of `organization_id` count, whoever asks: the engine's owner role sees every
-- organization's rows. The function runs with the rights of its caller (no SECURITY DEFINER), so under the API role
-- the organization's row-level security policies apply as well and it finds nothing of another organization.
CREATE FUNCTION dialtone_default_caller_id(organization_id TEXT, agent_id TEXT) RETURNS TEXT
LANGUAGE sql STABLE AS $$
    SELECT p."phoneNumber" FROM "PhoneNumber" p
    LEFT JOIN "Agent" a
        ON a."id" = dialtone_default_caller_id.agent_id
        AND a."organizationId" = dialtone_default_caller_id.organization_id
    WHERE p."organizationId" = dialtone_default_caller_id.organization_id AND p."outboundStatus" = 'ENABLED'
    ORDER BY p."id" IS DISTINCT FROM a."phoneNumberId", p."createdAt", p."id"
    LIMIT 1
$$;
