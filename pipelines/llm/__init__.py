"""Language-model providers: what the agent says next."""
