"""The server: aiohttp app, Twilio webhooks, media WebSocket, call sessions, REST API, dispatcher, CLI."""
