"""The organization's do-not-call list: reading it from CSV, and the `dialtone dnc` command."""
