"""Twilio: the voice, status and AMD webhooks, request signatures, the REST client, and placing outbound calls (and
settling those Twilio never confirmed)."""
