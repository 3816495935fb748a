"""The dedup window of recent ids: what it remembers, for how long, in what order."""

from __future__ import annotations

from msg.storage.index import RecentIds


def test_remembers_batches_and_single_ids_with_their_positions() -> None:
    recent = RecentIds(size=100)
    ids = ["a", "b", "c"]
    recent.add_many(ids, range(10, 13))
    ids.append("d")  # the caller reusing its list changes nothing remembered
    recent.add("e", 20)
    assert [recent.get(i) for i in "abcde"] == [10, 11, 12, None, 20]
    assert not recent.none_of(["x", "c"])
    assert recent.none_of(["x", "y", "d"])


def test_keeps_between_one_and_two_windows() -> None:
    recent = RecentIds(size=4)
    for n in range(12):
        recent.add_many([f"m{n}"], [n])
    remembered = [n for n in range(12) if recent.get(f"m{n}") is not None]
    assert 4 <= len(remembered) <= 8
    # The newest are the ones kept.
    assert remembered == list(range(12 - len(remembered), 12))


def test_a_generation_never_read_is_dropped_whole() -> None:
    recent = RecentIds(size=3)
    recent.add_many(["a", "b", "c"], range(3))  # fills the new generation: it turns old
    recent.add_many(["d", "e", "f"], range(3, 6))  # and again: "a".."c" are gone
    assert recent.none_of(["a", "b", "c"])
    assert [recent.get(i) for i in "def"] == [3, 4, 5]


def test_discard_forgets_an_id_whether_or_not_it_was_read_yet() -> None:
    recent = RecentIds(size=100)
    recent.add_many(["a", "b"], range(2))
    recent.discard("a")
    recent.add_many(["c"], [2])
    recent.discard("c")
    assert [recent.get(i) for i in "abc"] == [None, 1, None]


def test_a_later_position_of_the_same_id_wins() -> None:
    recent = RecentIds(size=100)
    recent.add_many(["a"], [1])
    recent.add("a", 5)
    assert recent.get("a") == 5
    recent.add_many(["a"], [9])
    assert recent.get("a") == 9
