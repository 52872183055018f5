"""The agent settings of speculative replies, mid-sentence pauses and the first clause: defaults and checks."""

from __future__ import annotations

import pytest

from config.agent import AgentConfigurationError, parse_agent_configuration


def test_defaults_speculate_early_and_wait_out_unfinished_sentences() -> None:
    config = parse_agent_configuration({})
    endpointing = config.endpointing
    assert (endpointing.speculate, endpointing.speculate_after_ms, endpointing.incomplete_silence_ms) == (
        True,
        120,
        1000,
    )
    assert endpointing.speculate_after_ms < endpointing.silence_ms < endpointing.incomplete_silence_ms
    assert (config.first_clause.enabled, config.first_clause.min_words) == (True, 4)


def test_the_settings_are_read_in_camel_case() -> None:
    config = parse_agent_configuration(
        {
            "endpointing": {"speculate": False, "speculateAfterMs": 200, "incompleteSilenceMs": 1500},
            "firstClause": {"enabled": False, "minWords": 6, "marks": ",;"},
        }
    )
    assert (config.endpointing.speculate, config.endpointing.speculate_after_ms) == (False, 200)
    assert config.endpointing.incomplete_silence_ms == 1500
    assert (config.first_clause.enabled, config.first_clause.min_words, config.first_clause.marks) == (False, 6, ",;")


@pytest.mark.parametrize(
    "configuration",
    [
        {"endpointing": {"speculateAfterMs": 10}},
        {"endpointing": {"incompleteSilenceMs": 100}},
        {"firstClause": {"minWords": 0}},
        {"firstClause": {"marks": ""}},
    ],
)
def test_out_of_range_values_are_refused(configuration: dict[str, object]) -> None:
    with pytest.raises(AgentConfigurationError):
        parse_agent_configuration(configuration)
