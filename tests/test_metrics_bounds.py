"""Metrics whose labels come from tenants' data keep to a bounded number of series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from engine.server.metrics import BoundedSeries


def test_labels_past_the_bound_are_counted_under_other_and_known_ones_still_count() -> None:
    registry = CollectorRegistry()
    counter = Counter("steps_total", "Steps.", ["path", "node"], registry=registry)
    steps = BoundedSeries(counter, limit=2)
    for node in ("a", "b", "c", "d", "a"):
        steps.inc("path-1", node)

    def count(path: str, node: str) -> float | None:
        return registry.get_sample_value("steps_total", {"path": path, "node": node})

    assert (count("path-1", "a"), count("path-1", "b")) == (2.0, 1.0)
    assert count("path-1", "c") is None and count("path-1", "d") is None
    assert count(BoundedSeries.OTHER, BoundedSeries.OTHER) == 2.0
