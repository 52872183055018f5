"""Conversation paths: each node type's data (nodes.py), the react-flow graph read and checked (graph.py), the
call's position on it (engine.py), a chat model's prompt and `follow_path` there (prompts.py, chat.py) and the
offline keyword chooser (offline.py)."""
