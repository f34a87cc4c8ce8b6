"""The user's longest gap, from reply times (kvmotion/lab/icmp.py)."""

from kvmotion.lab.icmp import longest_gap_ms

MS = 1_000_000


def test_the_longest_gap_between_replies() -> None:
    replies = [0, 10 * MS, 20 * MS, 250 * MS, 260 * MS]
    assert longest_gap_ms(replies) == 230.0


def test_a_window_counts_the_wait_before_the_first_reply_and_after_the_last() -> None:
    replies = [10 * MS, 20 * MS, 30 * MS]
    assert longest_gap_ms(replies, since_ns=15 * MS, until_ns=30 * MS) == 10.0
    # Nothing answered since the window began: the whole window is the gap.
    assert longest_gap_ms(replies, since_ns=40 * MS, until_ns=140 * MS) == 100.0
    assert longest_gap_ms([], since_ns=5 * MS, until_ns=25 * MS) == 20.0
