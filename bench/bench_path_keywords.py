"""How long the offline path runner takes to choose a way out of a large branch, on the event loop.

A path may have 5,000 edges, each with its own keywords; the choice runs on the loop that carries every call's
audio, so its time is a stall of every other call on the process. Builds a branch of `edges` ways out with
`keywords` made-up keyword phrases each (one to three words), then times `ConversationPathLLM.respond` for caller
turns of 5, 25 and 100 words (the first choice at a node also builds its chooser; later ones reuse it). Prints
figures; asserts nothing.

Usage: python -m bench.bench_path_keywords [--edges 100] [--keywords 50] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import string
import time
from typing import Any

from pipelines.llm.base import ConversationTurn
from pipelines.llm.conversation_path import ConversationPathLLM


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 10)))


def branch(edges: int, keywords: int, rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A start node with `edges` ways out, each to its own end node, each with `keywords` keyword phrases."""
    start = {"id": "start", "type": "speak", "data": {"text": "How can I help?", "isStart": True}}
    nodes: list[dict[str, Any]] = [start]
    links: list[dict[str, Any]] = []
    for index in range(edges):
        nodes.append({"id": f"end{index}", "type": "end", "data": {"text": f"Way {index}."}})
        phrases = [" ".join(_word(rng) for _ in range(rng.randint(1, 3))) for _ in range(keywords)]
        links.append({"id": f"e{index}", "source": "start", "target": f"end{index}", "data": {"keywords": phrases}})
    return nodes, links


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=100)
    parser.add_argument("--keywords", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(7)
    nodes, edges = branch(args.edges, args.keywords, rng)
    print(f"branch: {args.edges} ways out x {args.keywords} keyword phrases = {args.edges * args.keywords}")
    for words in (5, 25, 100):
        times: dict[str, list[float]] = {"first": [], "later": []}
        for _ in range(args.runs):
            model = ConversationPathLLM(nodes, edges)
            turns = [ConversationTurn("agent", "How can I help?")]
            heard = " ".join(_word(rng) for _ in range(words))
            for turn in range(2):  # the first choice builds the node's chooser, the second reuses it
                turns.append(ConversationTurn("caller", heard))
                started = time.perf_counter()
                replies = [event async for event in model.respond(list(turns))]
                elapsed = (time.perf_counter() - started) * 1000
                times["later" if turn else "first"].append(elapsed)
                turns.append(ConversationTurn("agent", str(replies)))
        print(
            f"caller turn of {words:3} words: median {statistics.median(times['first']):6.1f} ms at the node's first "
            f"choice, {statistics.median(times['later']):6.1f} ms later (max {max(times['later']):6.1f})"
        )


if __name__ == "__main__":
    asyncio.run(main())
