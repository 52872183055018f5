"""The process: the aiohttp app and its cleanup contexts, typed app keys, /health, /metrics and the CLI."""
