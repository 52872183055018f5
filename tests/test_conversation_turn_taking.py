"""Barge-in and backchannels as a pure policy: fed frame verdicts and words, it says when the caller takes the floor."""

from __future__ import annotations

from pipelines.conversation.turn_taking import OVERLAP_RESET_MS, BargeInPolicy, words_of


def policy(**changes: object) -> BargeInPolicy:
    settings: dict[str, object] = {
        "enabled": True,
        "threshold_ms": 300,
        "min_words": 1,
        "backchannel_words": ["uh-huh", "yeah", "okay"],
    }
    settings.update(changes)
    return BargeInPolicy.of(**settings)  # type: ignore[arg-type]


def feed(barge_in: BargeInPolicy, frames: str, *, agent_speaking: bool = True) -> list[bool]:
    """`frames` as one character per 20 ms frame: `v` voiced, `.` silent (the caller speaking throughout)."""
    return [
        barge_in.frame(voiced=frame == "v", caller_speaking=True, agent_speaking=agent_speaking) for frame in frames
    ]


def test_the_caller_takes_the_floor_after_speaking_over_the_agent_for_the_threshold() -> None:
    verdicts = feed(policy(threshold_ms=300), "v" * 15)

    assert verdicts.index(True) == 14  # 15 frames of 20 ms = 300 ms


def test_short_pauses_do_not_restart_the_count() -> None:
    barge_in = policy(threshold_ms=300)
    pause = "." * (OVERLAP_RESET_MS // 20 - 1)

    assert any(feed(barge_in, "v" * 8 + pause + "v" * 7))


def test_a_long_enough_pause_starts_a_new_count() -> None:
    barge_in = policy(threshold_ms=300)
    pause = "." * (OVERLAP_RESET_MS // 20)

    assert not any(feed(barge_in, "v" * 8 + pause + "v" * 7))


def test_speech_while_the_agent_is_silent_never_counts() -> None:
    barge_in = policy(threshold_ms=100)

    assert not any(feed(barge_in, "v" * 50, agent_speaking=False))
    assert barge_in.overlap_ms == 0


def test_the_tail_of_the_callers_own_turn_does_not_interrupt() -> None:
    barge_in = policy(threshold_ms=100)

    verdicts = [barge_in.frame(voiced=True, caller_speaking=False, agent_speaking=True) for _ in range(20)]

    assert not any(verdicts)


def test_a_disabled_policy_never_interrupts() -> None:
    barge_in = policy(enabled=False, threshold_ms=100)

    assert not any(feed(barge_in, "v" * 50))
    assert not barge_in.words_interrupt("stop stop stop")


def test_backchannels_alone_do_not_take_the_floor_but_words_do() -> None:
    barge_in = policy(min_words=1)

    assert not barge_in.words_interrupt("Uh-huh, yeah.")
    assert barge_in.words_interrupt("yeah wait")


def test_min_words_counts_only_words_that_are_not_backchannels() -> None:
    barge_in = policy(min_words=2)

    assert not barge_in.words_interrupt("okay wait")
    assert barge_in.words_interrupt("okay wait no")


def test_a_whole_turn_of_backchannels_is_not_a_turn_to_answer() -> None:
    barge_in = policy()

    assert barge_in.is_backchannel("Okay. Yeah!")
    assert not barge_in.is_backchannel("okay book it")
    assert not barge_in.is_backchannel("   ")


def test_words_lose_case_and_punctuation() -> None:
    assert words_of('"Yes," she said... OK?') == ["yes", "she", "said", "ok"]
