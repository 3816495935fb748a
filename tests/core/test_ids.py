"""Message ids: prefix, '-', and a counter that never repeats within a run."""

from __future__ import annotations

import pytest

from msg.core.ids import SequentialIds


def test_ids_count_up_across_every_digit_boundary() -> None:
    ids = SequentialIds("run")
    made = [*ids.next_ids(5), ids.next_id()]
    for count in (994, 1, 1, 2_000, 1, 7_000, 3, 990_000, 1, 2):
        made += ids.next_ids(count)
    assert made == [f"run-{n}" for n in range(1, len(made) + 1)]
    assert len(made) == len(set(made)) == 1_000_009


@pytest.mark.parametrize("prefix", ["", "a b", "a%d", "é"])
def test_a_prefix_is_ascii_letters_digits_and_dashes(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        SequentialIds(prefix)
