"""Conversation paths: the react-flow graph (graph.py), the call's position on it (engine.py), the prompt a chat
model gets at a node (prompts.py) and the offline keyword chooser (offline.py)."""
