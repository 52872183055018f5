"""Configuration: engine settings and the agent configuration schema."""
