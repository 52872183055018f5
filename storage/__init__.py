"""PostgreSQL storage: the pool, the embedded server, migrations and one module per aggregate."""

from storage.records import Pool

__all__ = ["Pool"]
