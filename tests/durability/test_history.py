"""The history checker's own tests: each category, from hand-written histories.

Plain functions, no broker and no event loop: a history is just a record.
"""

from __future__ import annotations

from typing import Any

import pytest

from msg.protocol.frames import Mode
from tests.durability.history import History, Outcome, Reader, Report, payload_key

Q = Mode.QUEUE
T = Mode.PUBSUB


def message(key: str, body: Any = 0) -> dict[str, Any]:
    return {"k": key, "body": body}


def deliver_and_ack(history: History, reader: Reader, key: str, message_id: str) -> None:
    history.delivered(reader, message(key), message_id)
    history.ack_sent(reader, key)
    history.consumed(reader, key)


def test_a_clean_history_is_ok() -> None:
    history = History()
    jobs = history.queue("jobs")
    for n in range(3):
        key = history.invoke(Q, "jobs", message(f"m{n}"))
        history.acked(key, f"id-{n}")
    for n in range(3):
        deliver_and_ack(history, jobs, f"m{n}", f"id-{n}")
    report = history.check()
    assert report.ok, report.describe()
    assert report.counts() == {
        "attempted": 3,
        "acked": 3,
        "refused": 0,
        "unknown": 0,
        "delivered": 3,
        "consumed": 3,
        "ack_unknown": 0,
        "lost": 0,
        "unexpected": 0,
        "refused_delivered": 0,
        "mismatched": 0,
        "returned_after_ack": 0,
        "duplicated": 0,
        "most_consumed": 1,
        "recovered": 0,
    }
    assert report.summary() == "attempted=3 acked=3 delivered=3 consumed=3 most_consumed=1"


def test_an_acked_message_never_delivered_is_lost() -> None:
    history = History()
    history.queue("jobs")
    history.acked(history.invoke(Q, "jobs", message("a")), "id-a")
    report = history.check()
    assert not report.ok
    assert report.lost == 1
    assert report.examples["lost"] == ("jobs: a (id-a; never delivered)",)


def test_a_message_delivered_but_never_acked_and_not_redelivered_is_lost() -> None:
    # Delivered before the crash, no ack sent, and gone after the restart.
    history = History()
    jobs = history.queue("jobs")
    history.acked(history.invoke(Q, "jobs", message("a")), "id-a")
    history.delivered(jobs, message("a"), "id-a")
    report = history.check()
    assert report.lost == 1
    assert "delivered, never consumed" in report.examples["lost"][0]


def test_a_message_whose_ack_got_no_reply_may_be_gone() -> None:
    history = History()
    jobs = history.queue("jobs")
    history.acked(history.invoke(Q, "jobs", message("a")), "id-a")
    history.delivered(jobs, message("a"), "id-a")
    history.ack_sent(jobs, "a")  # the broker died before replying; it may have applied it
    report = history.check()
    assert report.ok, report.describe()
    assert report.ack_unknown == 1


def test_unknown_outcomes_may_go_either_way() -> None:
    history = History()
    jobs = history.queue("jobs")
    history.invoke(Q, "jobs", message("vanished"))
    history.invoke(Q, "jobs", message("stored"))
    deliver_and_ack(history, jobs, "stored", "id-s")
    report = history.check()
    assert report.ok, report.describe()
    assert (report.unknown, report.recovered, report.lost) == (2, 1, 0)
    assert history.outcome("vanished") is Outcome.UNKNOWN


def test_a_message_nobody_published_is_unexpected() -> None:
    history = History()
    jobs = history.queue("jobs")
    history.invoke(T, "jobs", message("topic-not-queue"))
    history.invoke(Q, "other", message("other-queue"))
    assert history.delivered(jobs, message("never-published"), "x-1") is None
    assert history.delivered(jobs, message("topic-not-queue"), "x-2") is None
    assert history.delivered(jobs, message("other-queue"), "x-3") is None
    assert history.delivered(jobs, {"no": "key"}, "x-4") is None
    assert history.delivered(jobs, [1, 2], "x-5") is None
    report = history.check()
    assert not report.ok
    assert report.unexpected == 5


def test_a_refused_publish_must_not_be_delivered() -> None:
    history = History()
    jobs = history.queue("jobs")
    history.refused(history.invoke(Q, "jobs", message("a")), "storage_error")
    report = history.check()
    assert report.ok
    assert report.refused == 1
    deliver_and_ack(history, jobs, "a", "id-a")
    report = history.check()
    assert report.refused_delivered == 1
    assert report.examples["refused_delivered"] == ("jobs: a (storage_error)",)


def test_payloads_are_compared_as_json() -> None:
    history = History()
    jobs = history.queue("jobs")
    history.acked(history.invoke(Q, "jobs", {"k": "a", "x": 1, "y": [True, None]}), "id-a")
    history.acked(history.invoke(Q, "jobs", {"k": "b", "x": 1}), "id-b")
    # Key order does not matter; 1.0 is not 1 and "é" must survive.
    history.delivered(jobs, {"y": [True, None], "x": 1, "k": "a"}, "id-a")
    history.delivered(jobs, {"k": "b", "x": 1.0}, "id-b")
    report = history.check()
    assert report.mismatched == 1
    assert report.examples["mismatched"][0].startswith("jobs: b: payload")


def test_a_message_id_must_match_the_ack_and_earlier_deliveries() -> None:
    history = History()
    topic = history.durable("news", "d", existing=True)
    history.acked(history.invoke(T, "news", message("acked")), "id-1")
    history.invoke(T, "news", message("unknown"))
    history.delivered(topic, message("acked"), "id-other")
    history.delivered(topic, message("unknown"), "id-2")
    history.delivered(topic, message("unknown"), "id-2")
    history.delivered(topic, message("unknown"), "id-3")
    report = history.check()
    assert report.mismatched == 2
    assert report.examples["mismatched"] == (
        "news/d: acked: id id-other, expected id-1",
        "news/d: unknown: id id-3, expected id-2",
    )


def test_a_queue_message_must_not_return_after_its_ack_was_confirmed() -> None:
    history = History()
    jobs = history.queue("jobs")
    history.acked(history.invoke(Q, "jobs", message("a")), "id-a")
    deliver_and_ack(history, jobs, "a", "id-a")
    deliver_and_ack(history, jobs, "a", "id-a")
    report = history.check()
    assert not report.ok
    assert (report.returned_after_ack, report.duplicated) == (1, 1)


def test_a_queue_message_acked_without_a_reply_may_return() -> None:
    history = History()
    jobs = history.queue("jobs")
    history.acked(history.invoke(Q, "jobs", message("a")), "id-a")
    history.delivered(jobs, message("a"), "id-a")
    history.ack_sent(jobs, "a")  # the broker died before replying
    deliver_and_ack(history, jobs, "a", "id-a")
    report = history.check()
    assert report.ok, report.describe()
    assert (report.delivered, report.consumed, report.duplicated) == (2, 1, 0)


def test_a_durable_message_must_not_return_after_its_ack_was_confirmed() -> None:
    history = History()
    news = history.durable("news", "d", existing=True)
    history.acked(history.invoke(T, "news", message("a")), "id-a")
    history.acked(history.invoke(T, "news", message("b")), "id-b")
    deliver_and_ack(history, news, "a", "id-a")
    deliver_and_ack(history, news, "a", "id-a")
    history.delivered(news, message("b"), "id-b")
    history.ack_sent(news, "b")  # no reply: it may come back
    deliver_and_ack(history, news, "b", "id-b")
    report = history.check()
    assert not report.ok
    assert (report.returned_after_ack, report.duplicated, report.most_consumed) == (1, 1, 2)
    assert report.examples["returned_after_ack"] == ("news/d: a (id-a)",)


def test_an_auto_ack_durable_subscription_may_deliver_again_after_a_crash() -> None:
    history = History()
    news = history.durable("news", "d", existing=True, auto_ack=True)
    history.acked(history.invoke(T, "news", message("a")), "id-a")
    history.delivered(news, message("a"), "id-a")
    history.delivered(news, message("a"), "id-a")
    report = history.check()
    assert report.ok, report.describe()
    assert (report.returned_after_ack, report.duplicated, report.most_consumed) == (0, 1, 2)


def test_a_durable_subscription_is_owed_only_what_was_published_after_it() -> None:
    history = History()
    history.acked(history.invoke(T, "news", message("before")), "id-1")
    news = history.durable("news", "late")
    assert history.durable("news", "late") is news  # registered once
    history.acked(history.invoke(T, "news", message("after")), "id-2")
    report = history.check()
    assert report.lost == 1
    assert report.examples["lost"] == ("news/late: after (id-2; never delivered)",)
    deliver_and_ack(history, news, "before", "id-1")  # allowed, not owed
    deliver_and_ack(history, news, "after", "id-2")
    assert history.check().ok


def test_every_durable_subscription_of_a_topic_is_owed_each_message() -> None:
    history = History()
    one = history.durable("news", "one", existing=True)
    history.durable("news", "two", existing=True)
    history.acked(history.invoke(T, "news", message("a")), "id-a")
    deliver_and_ack(history, one, "a", "id-a")
    report = history.check()
    assert report.lost == 1
    assert report.examples["lost"] == ("news/two: a (id-a; never delivered)",)


def test_auto_ack_readers_consume_on_delivery() -> None:
    history = History()
    jobs = history.queue("jobs", auto_ack=True)
    history.acked(history.invoke(Q, "jobs", message("a")), "id-a")
    history.delivered(jobs, message("a"), "id-a")
    report = history.check()
    assert report.ok, report.describe()
    assert report.consumed == 1


def test_a_refused_consumer_ack_is_not_of_unknown_outcome() -> None:
    history = History()
    jobs = history.queue("jobs")
    history.acked(history.invoke(Q, "jobs", message("a")), "id-a")
    history.delivered(jobs, message("a"), "id-a")
    history.ack_sent(jobs, "a")
    history.ack_refused(jobs, "a")
    deliver_and_ack(history, jobs, "a", "id-a")
    report = history.check()
    assert report.ok
    assert report.ack_unknown == 0


def test_keys_must_be_present_and_unique() -> None:
    history = History()
    history.invoke(Q, "jobs", message("a"))
    with pytest.raises(ValueError, match="published twice"):
        history.invoke(Q, "jobs", message("a"))
    with pytest.raises(ValueError, match="has no key"):
        history.invoke(Q, "jobs", {"n": 1})


def test_a_custom_key_function() -> None:
    history = History(key_of=lambda payload: str(payload))
    jobs = history.queue("jobs")
    history.acked(history.invoke(Q, "jobs", 7), "id-7")
    assert history.delivered(jobs, 7, "id-7") == "7"
    assert payload_key({"k": 7}) is None


def test_acked_count_follows_the_acks() -> None:
    history = History()
    assert history.acked_count == 0
    history.acked(history.invoke(Q, "jobs", message("a")), "id-a")
    assert history.acked_count == 1


def test_reports_add_up() -> None:
    one = Report(attempted=2, acked=1, lost=1, most_consumed=3, examples={"lost": ("q: a",)})
    two = Report(attempted=3, duplicated=2, lost=1, most_consumed=2, examples={"lost": ("q: b",)})
    total = one + two
    assert (total.attempted, total.acked, total.lost, total.duplicated) == (5, 1, 2, 2)
    assert total.most_consumed == 3
    assert total.examples == {"lost": ("q: a", "q: b")}
    assert not total.ok
    assert total.describe() == (
        "attempted=5 acked=1 lost=2 duplicated=2 most_consumed=3\n  lost: q: a; q: b"
    )
    assert Report().describe() == "empty history"
