"""One module per resource of the /v1 API; each declares a `resource` (see engine/api/__init__.py)."""
