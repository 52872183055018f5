"""PostgreSQL storage: the pool, the embedded server, migrations and one module per aggregate."""
