"""Conversation paths the path tests share, in react-flow JSON: a node of every type, lines holding variables."""

from __future__ import annotations

from typing import Any

TRANSFER_TO = "+14155557654"
"""A US number the default dial policy dials (a transfer obeys it): +1 555 numbers are of no known type."""

GREETING = "Thanks for calling Acme. Are you calling about billing, or an order?"
ASK_ACCOUNT = "Please enter your four digit account number."
BILLING = "Thank you. Let me look that up."
ORDER = "Which order is it about?"
ANSWER_FALLBACK = "I could not find that, but a colleague will call you back."
HUMAN = "Connecting you to a person now."
GOODBYE = "Thank you for calling. Goodbye!"
MENU = "Navigating the menu."
KEY_TIMEOUT_S = 2.0
"""The gather node's wait for each key."""

EVERY_TYPE_NODES: list[dict[str, Any]] = [
    {"id": "greet", "type": "speak", "data": {"isStart": True, "text": GREETING}},
    {
        "id": "account",
        "type": "gather",
        "data": {
            "text": ASK_ACCOUNT,
            "variable": "account",
            "digitCount": 4,
            "terminator": "#",
            "timeoutSeconds": KEY_TIMEOUT_S,
        },
    },
    {"id": "lookup", "type": "webhook", "data": {"tool": "lookup_account", "variable": "balance"}},
    {
        "id": "billing",
        "type": "prompt",
        "data": {
            "instructions": "Tell the caller their balance, {{balance}}, for the line {{customer.number}}.",
            "text": BILLING,
        },
    },
    {"id": "lookup-failed", "type": "end", "data": {"text": "Sorry, our system is down. " + GOODBYE}},
    {
        "id": "order",
        "type": "prompt",
        "data": {
            "instructions": "Ask which order the call is about and note its number.",
            "text": ORDER,
            "extractVariables": [{"name": "order_number", "description": "The order's number"}],
        },
    },
    {"id": "listen", "type": "wait", "data": {}},
    {"id": "kb", "type": "knowledge", "data": {"fallback": ANSWER_FALLBACK}},
    {"id": "menu", "type": "press_digits", "data": {"digits": "1w2"}},
    {"id": "goodbye", "type": "end", "data": {"text": GOODBYE}},
    {
        "id": "human",
        "type": "global",
        "data": {"condition": "The caller asks for a human", "keywords": ["human", "person", "agent"]},
    },
    {"id": "transfer", "type": "transfer", "data": {"number": TRANSFER_TO, "text": HUMAN}},
]
EVERY_TYPE_EDGES: list[dict[str, Any]] = [
    {"id": "to-billing", "source": "greet", "target": "account", "data": {"label": "Billing", "keywords": ["billing"]}},
    {"id": "to-order", "source": "greet", "target": "order", "data": {"label": "An order", "keywords": ["order"]}},
    {"id": "got-account", "source": "account", "target": "lookup"},
    {"id": "found", "source": "lookup", "target": "billing", "data": {"result": "success"}},
    {"id": "not-found", "source": "lookup", "target": "lookup-failed", "data": {"result": "failure"}},
    {"id": "billing-done", "source": "billing", "target": "goodbye", "data": {"keywords": ["thanks", "bye"]}},
    {"id": "order-named", "source": "order", "target": "listen", "data": {"condition": "The caller named an order"}},
    {"id": "heard", "source": "listen", "target": "kb"},
    {"id": "answered", "source": "kb", "target": "menu", "data": {"keywords": ["menu"]}},
    {"id": "kb-done", "source": "kb", "target": "goodbye", "data": {"keywords": ["thanks", "bye"]}},
    {"id": "menu-done", "source": "menu", "target": "goodbye"},
    {"id": "to-person", "source": "human", "target": "transfer"},
]

PASSING_LOOP_NODES: list[dict[str, Any]] = [
    {"id": "menu", "type": "speak", "data": {"isStart": True, "text": GREETING}},
    {"id": "tones", "type": "press_digits", "data": {"digits": "0"}},
    {"id": "check", "type": "webhook", "data": {"tool": "lookup_account"}},
]
PASSING_LOOP_EDGES: list[dict[str, Any]] = [
    {"id": "to-tones", "source": "menu", "target": "tones", "data": {"keywords": ["agent"]}},
    {"id": "to-check", "source": "tones", "target": "check"},
    {"id": "again", "source": "check", "target": "tones"},
]
"""A path the API refuses, as another writer may store it: the caller's "agent" plays a tone and calls a webhook,
then the tone again, and so on: no node on the loop waits for the caller, and no way leaves it."""

VARIABLES_PATH_NODES: list[dict[str, Any]] = [
    {
        "id": "greet",
        "type": "speak",
        "data": {
            "isStart": True,
            "text": "Hi {{customer.name}}, this is Acme about your {{ plan }} plan. Which order is it about?",
            "extractVariables": [{"name": "order_number", "description": "The order's number"}],
        },
    },
    {
        "id": "code",
        "type": "gather",
        "data": {"text": "Order {{order_number}}: enter your two digit code.", "variable": "code", "digitCount": 2},
    },
    {"id": "bye", "type": "end", "data": {"text": "Code {{code}} is noted{{nowhere}}, {{customer.name}}. Goodbye!"}},
]
VARIABLES_PATH_EDGES: list[dict[str, Any]] = [
    {
        "id": "named",
        "source": "greet",
        "target": "code",
        "data": {"condition": "The caller named an order", "digit": 1},  # offline: the caller presses 1
    },
    {"id": "got-code", "source": "code", "target": "bye"},
]
"""A path whose every line holds `{{…}}`: the call's variables (`customer.name`, the agent's `plan`), what a node
before gathered (`order_number` the model extracted, the keys into `code`), and a name nothing answers."""
