"""Campaigns: the dispatcher that dials recipients within calling windows, recipient CSV import and the CLI."""
