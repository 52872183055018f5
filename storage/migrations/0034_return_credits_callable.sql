-- 0034: the engine may call "dialtone_return_credits"() whatever role it connects as.
--
-- 0033 revoked it from PUBLIC with the SECURITY DEFINER trigger functions, but the engine calls it itself when crash
-- recovery settles the reservations of lost calls (credit_reservations.settle_orphaned_reservations): an engine
-- connected as a role of its own (table grants, not the owner's role, as on a managed server) failed to start,
-- "permission denied for function dialtone_return_credits". It is not SECURITY DEFINER: it runs with its caller's
-- rights, so a role without rights on "CreditReturn" and "Organization" (the API role) can do nothing with it.
GRANT EXECUTE ON FUNCTION "dialtone_return_credits"() TO PUBLIC;
