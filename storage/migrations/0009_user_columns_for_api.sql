-- 0009: the API reads its members' "User" rows for who they are (name, email, role), never their credentials:
-- SELECT on the table (0005) becomes SELECT on every column but "password" and "twoFactorSecret", so not even
-- a query the API did not mean to make can read a password hash or a second-factor secret.

REVOKE SELECT ON "User" FROM dialtone_api;
GRANT SELECT ("id", "email", "firstName", "lastName", "phone", "timeZone", "avatar", "role", "status",
              "twoFactorEnabled", "createdAt", "updatedAt") ON "User" TO dialtone_api;
