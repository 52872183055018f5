"""What a language model is told at a node of the path: the system prompt and the `follow_path` function.

The system prompt is the agent's prompt, the path's `agentSpeech` (how to speak) and the current node: its
instructions (a prompt or global node), the words already said (a speak node), the digits awaited (gather), the
passages found (knowledge). The ways out of the node are offered as one function, `follow_path`, whose `way`
is an edge id (or `global:<node id>`), each described by its label or condition; the variables the node asks for
are the function's `variables`, so the model both moves and extracts in one call.
"""

from __future__ import annotations

from typing import Any, Final

from pipelines.paths.engine import PathEngine
from pipelines.paths.graph import (
    GatherData,
    GlobalData,
    KnowledgeData,
    LegacyData,
    PromptData,
    SpeakData,
    WaitData,
    WebhookData,
)
from pipelines.tools import FunctionSpec

__all__ = ["FOLLOW_PATH", "follow_path_function", "node_instructions", "system_prompt"]

FOLLOW_PATH: Final = "follow_path"
"""The function a model calls to move along the path."""


def node_instructions(engine: PathEngine) -> str:
    """What the model should do at the current node, the node's own words with their variables filled in."""
    node = engine.node
    data = node.data
    match data:
        case PromptData(instructions=instructions) | GlobalData(instructions=str() as instructions):
            return engine.fill(instructions)
        case KnowledgeData(instructions=instructions, fallback=fallback):
            if not engine.passages:
                return f"Nothing was found for the caller's question; you already said: {engine.fill(fallback)!r}."
            # The passages are the knowledge base's text, told as found: only the node's own words are filled.
            found = "\n".join(f"- {passage}" for passage in engine.passages)
            asked = engine.fill(instructions) if instructions else "Answer the caller from these passages only."
            return f"{asked}\nPassages:\n{found}"
        case GatherData(variable=variable):
            return (
                f"The caller is entering digits on the keypad into {variable!r}; wait for them, do not read them out."
            )
        case SpeakData() | LegacyData() | GlobalData():
            said = engine.fill(node.text)
            return f"You just said, word for word: {said!r}. Listen to the caller's answer." if said else ""
        case WaitData():
            return "Listen to the caller; let them speak first."
        case WebhookData():
            return ""
        case _:
            return engine.fill(node.text)


def system_prompt(instructions: str, agent_speech: str | None, engine: PathEngine) -> str:
    """The agent's prompt, the path's speaking style and the current node's instructions and ways out."""
    parts = [instructions.strip()] if instructions.strip() else []
    if agent_speech and agent_speech.strip():
        parts.append(f"How to speak:\n{agent_speech.strip()}")
    node = engine.node
    lines = [f"You follow a conversation path. You are at step {node.id!r} ({node.kind})."]
    if guidance := node_instructions(engine):
        lines.append(guidance)
    if engine.variables:
        known = ", ".join(f"{name}={value!r}" for name, value in engine.variables.items())
        lines.append(f"Known so far: {known}.")
    ways = engine.ways()
    if ways:
        lines.append(
            f"When the caller's answer fits one of these ways, call {FOLLOW_PATH} with its name instead of "
            "answering yourself (the next step will tell you what to say); otherwise keep the conversation here:"
        )
        lines.extend(f"- {way.key}: {way.description}" for way in ways)
    parts.append("\n".join(lines))
    return "\n\n".join(parts)


def follow_path_function(engine: PathEngine) -> FunctionSpec | None:
    """The `follow_path` function for the current node, or None when no way leads out of it."""
    ways = engine.ways()
    if not ways:
        return None
    described = "; ".join(f"{way.key!r}: {way.description}" for way in ways)
    variables: dict[str, Any] = {
        spec.name: {"type": "string", "description": spec.description or spec.name}
        for spec in engine.node.data.extract_variables
    }
    properties: dict[str, Any] = {
        "way": {"type": "string", "enum": [way.key for way in ways], "description": f"Where to go: {described}"}
    }
    if variables:
        properties["variables"] = {
            "type": "object",
            "description": "What the caller said that this step asks for.",
            "properties": variables,
        }
    return FunctionSpec(
        FOLLOW_PATH,
        f"Move the conversation to the next step of the path. Ways from here: {described}",
        {"type": "object", "properties": properties, "required": ["way"]},
    )
