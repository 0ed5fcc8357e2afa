"""The interruption ledger's arithmetic: attempts, rounds trained twice, just-in-time saves."""

from jobs.interruptions import summarize


def test_an_uninterrupted_fit_redid_nothing():
    assert summarize([{"resumed_from": 0, "reached": 300, "jit_round": None}]) == {
        "attempts": 1,
        "interruptions": 0,
        "rounds_redone": 0,
        "just_in_time_checkpoints": 0,
        "just_in_time_rounds": [],
        "resumed_from": [],
    }


def test_rounds_past_the_resumed_checkpoint_were_trained_twice():
    attempts = [
        {"resumed_from": 0, "reached": 730, "jit_round": 610},  # noticed at 610, lost at 730
        {"resumed_from": 610, "reached": 1400, "jit_round": None},  # lost without notice
        {"resumed_from": 1000, "reached": 3000, "jit_round": None},  # from the periodic one
    ]
    summary = summarize(attempts)
    assert summary["interruptions"] == 2
    assert summary["rounds_redone"] == (730 - 610) + (1400 - 1000)
    assert summary["just_in_time_rounds"] == [610]
    assert summary["resumed_from"] == [610, 1000]
