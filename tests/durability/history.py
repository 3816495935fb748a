"""A history checker for a message broker, in the style of Jepsen's total-queue.

Theory of operation
-------------------
A test records what its clients did and saw, as it happens, in a :class:`History`;
after the run (and after draining every queue and durable subscription) it asks the
history to :meth:`~History.check` itself. Nothing here talks to a broker: the
history is a plain record, so the same checker serves SIGKILL rounds, storage
crash simulations and unit tests alike.

What is recorded:

- **Publishes.** :meth:`~History.invoke` when a publish is about to be sent; then
  :meth:`~History.acked` (the broker's ack arrived, with its message id) or
  :meth:`~History.refused` (an error reply: the broker says it did *not* store it).
  A publish with neither is of **unknown outcome**: the connection died while it was
  in flight, so it may or may not have been stored. Messages are identified by a
  *key* the test puts inside the payload (:func:`payload_key` reads ``payload["k"]``),
  because a publish whose ack never arrived has no message id.
- **Readers.** A reader is whatever must see a destination's messages: a queue (all
  its consumers together), or one durable subscription of a topic.
  :meth:`~History.queue` and :meth:`~History.durable` register them. A durable
  subscription only owes the messages published after its cursor existed, so it is
  registered when its subscribe was acked, and only publishes *invoked* after that
  are owed to it (earlier ones may be delivered, but need not be).
- **Deliveries and consumption.** :meth:`~History.delivered` for every message a
  reader receives; :meth:`~History.consumed` when the broker confirmed the
  consumer's ack (its reply arrived). A reader created with ``auto_ack`` consumes on
  delivery. An ack sent whose reply never came (:meth:`~History.ack_sent` without
  :meth:`~History.consumed`) is of unknown outcome, like a publish.

Events get increasing ticks, so "after" means "recorded later" in the test's one
event loop.

Classification (:meth:`~History.check`), per reader and key:

- **lost** — acked by the broker, owed to the reader, never consumed by it, and no
  ack of it is of unknown outcome (an ack whose reply never came may have been
  applied). Must be 0. A message delivered before a crash but not acked must be
  delivered again and consumed, so "delivered once, then gone" counts as lost too.
- **unexpected** — delivered, but never published to that destination (or its payload
  has no key). Must be 0.
- **refused_delivered** — delivered although its publish got an error reply, which
  promises it was not stored. Must be 0.
- **mismatched** — delivered with a payload different from the one published, or
  with a message id other than the one its ack (or an earlier delivery) carried.
  Must be 0.
- **returned_after_ack** — a message delivered again to a reader after the broker had
  confirmed that reader's ack of it: a queue message, or one of a manual-ack durable
  subscription (whose cursor keeps the positions acked out of order, not just a
  floor). Must be 0. Auto-ack durable readers are exempt: they consume on delivery,
  before the cursor has moved, so a crash may deliver such a message again (at least
  once), which shows up as a duplicate.
- **duplicated** — consumptions beyond the first, summed over readers and keys.
  Counted; with manual acks each one is also a returned ack, so 0 there (a message
  whose ack got no reply may come back, but that ack was never a consumption);
  ``most_consumed`` is the most times one reader consumed one message.
- **recovered** — publishes of unknown outcome that were consumed: the broker had
  stored them before it died. Allowed; a count of how often that happens.

:class:`Report` holds the counts and a few examples of each problem; :attr:`Report.ok`
is true when every must-be-zero count is zero, and :meth:`Report.describe` says why
not. Reports add up (``+``) so a many-round test can print totals.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Final

from msg.protocol.frames import Mode

__all__ = ["MUST_BE_ZERO", "History", "Outcome", "Reader", "Report", "payload_key"]

ReaderKey = tuple[Mode, str, str | None]
"""What identifies a reader: (mode, topic, durable name)."""
# Examples kept per problem category: enough to debug from, short enough to print.
_EXAMPLES: Final = 5
MUST_BE_ZERO: Final = (
    "lost",
    "unexpected",
    "refused_delivered",
    "mismatched",
    "returned_after_ack",
)
"""The counts of a :class:`Report` that are violations of the broker's promises."""


class Outcome(StrEnum):
    """What the publisher learned about one publish."""

    UNKNOWN = "unknown"
    """Sent; no reply (yet): it may or may not have been stored."""
    ACKED = "acked"
    """The broker acked it: it must be delivered."""
    REFUSED = "refused"
    """The broker answered with an error: it was not stored."""


def payload_key(payload: Any) -> str | None:
    """The key a test put in a payload: ``payload["k"]`` if it is a string."""
    if isinstance(payload, dict):
        key = payload.get("k")
        if isinstance(key, str):
            return key
    return None


def _canonical(payload: Any) -> str:
    # Payloads are compared as JSON, not as Python values (1 == 1.0 == True in Python),
    # and regardless of key order, which JSON does not define.
    return json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Reader:
    """Something that must receive a destination's messages."""

    name: str
    """For people: the queue, or ``topic/durable name``."""
    mode: Mode
    topic: str
    durable: str | None
    """The durable subscription's name (None for a queue)."""
    since: int
    """Publishes invoked at or before this tick are not owed to the reader."""
    acked_may_return: bool
    """Whether a message may be delivered again after its ack was confirmed."""
    auto_ack: bool
    """Whether a delivery counts as consumption (no ack is sent)."""

    @property
    def key(self) -> ReaderKey:
        return (self.mode, self.topic, self.durable)


@dataclass(slots=True)
class _Publish:
    key: str
    mode: Mode
    topic: str
    canonical: str
    invoked: int
    outcome: Outcome = Outcome.UNKNOWN
    message_id: str | None = None
    error: str | None = None


@dataclass(slots=True)
class _Seen:
    """What one reader saw of one key."""

    deliveries: int = 0
    consumptions: int = 0
    first_consumed: int | None = None
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """The classification of a history; see the module docstring."""

    attempted: int = 0
    acked: int = 0
    refused: int = 0
    unknown: int = 0
    delivered: int = 0
    consumed: int = 0
    ack_unknown: int = 0
    lost: int = 0
    unexpected: int = 0
    refused_delivered: int = 0
    mismatched: int = 0
    returned_after_ack: int = 0
    duplicated: int = 0
    most_consumed: int = 0
    """The most times one reader consumed one message (a maximum, not a sum)."""
    recovered: int = 0
    examples: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every must-be-zero count is zero."""
        return all(getattr(self, name) == 0 for name in MUST_BE_ZERO)

    def counts(self) -> dict[str, int]:
        """Every count, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "examples"}

    def summary(self) -> str:
        """One line: every non-zero count."""
        return " ".join(f"{name}={value}" for name, value in self.counts().items() if value)

    def describe(self) -> str:
        """The summary, then examples of each problem found."""
        lines = [self.summary() or "empty history"]
        for name, examples in self.examples.items():
            lines.append(f"  {name}: " + "; ".join(examples))
        return "\n".join(lines)

    def __add__(self, other: Report) -> Report:
        examples = dict(self.examples)
        for name, more in other.examples.items():
            examples[name] = (examples.get(name, ()) + more)[:_EXAMPLES]
        mine, theirs = self.counts(), other.counts()
        totals = {name: mine[name] + theirs[name] for name in mine}
        totals["most_consumed"] = max(self.most_consumed, other.most_consumed)
        return replace(self, examples=examples, **totals)


class History:
    """Everything clients did and saw, to be checked after the run."""

    def __init__(self, key_of: Callable[[Any], str | None] = payload_key) -> None:
        """``key_of`` finds a message's key in its payload (None: it has none)."""
        self._key_of = key_of
        self._clock = itertools.count(1)
        self._publishes: dict[str, _Publish] = {}
        self._readers: dict[ReaderKey, Reader] = {}
        self._seen: dict[ReaderKey, dict[str, _Seen]] = {}
        """Per reader, per message key, what it saw."""
        self._strays: dict[str, list[str]] = {}
        """Per category, examples of the problems found while recording."""
        self._stray_counts: dict[str, int] = {
            "unexpected": 0,
            "refused_delivered": 0,
            "mismatched": 0,
            "returned_after_ack": 0,
        }
        self._acks_sent: set[tuple[ReaderKey, str]] = set()
        """Consumer acks sent whose reply has not come (yet): (reader, message key)."""
        self._acked_count = 0

    @property
    def acked_count(self) -> int:
        """How many publishes have been acked so far."""
        return self._acked_count

    def tick(self) -> int:
        """Take the next tick (each event takes one)."""
        return next(self._clock)

    # -- readers ---------------------------------------------------------------------

    def queue(self, name: str, *, auto_ack: bool = False) -> Reader:
        """The reader of queue ``name`` (all its consumers): owed every acked message;
        a message whose ack was confirmed never comes back."""
        return self._reader(
            Reader(name, Mode.QUEUE, name, None, 0, acked_may_return=False, auto_ack=auto_ack)
        )

    def durable(
        self, topic: str, name: str, *, existing: bool = False, auto_ack: bool = False
    ) -> Reader:
        """Durable subscription ``name`` on ``topic``, to register once its subscribe was
        acked (or ``existing``: its cursor predates every publish of this history).

        With manual acks, a message whose ack was confirmed must never come back: the
        cursor keeps every position acked, in order or not. With ``auto_ack`` a
        delivered message may come back after a crash.

        Registering a name again returns the reader registered first."""
        since = 0 if existing else self.tick()
        return self._reader(
            Reader(
                f"{topic}/{name}",
                Mode.PUBSUB,
                topic,
                name,
                since,
                acked_may_return=auto_ack,
                auto_ack=auto_ack,
            )
        )

    def _reader(self, reader: Reader) -> Reader:
        known = self._readers.get(reader.key)
        if known is not None:
            return known
        self._readers[reader.key] = reader
        self._seen[reader.key] = {}
        return reader

    # -- publishes -------------------------------------------------------------------

    def invoke(self, mode: Mode, topic: str, payload: Any) -> str:
        """A publish of ``payload`` is about to be sent; returns its key."""
        key = self._key_of(payload)
        if key is None:
            raise ValueError(f"payload has no key: {payload!r:.100}")
        if key in self._publishes:
            raise ValueError(f"key {key!r} published twice: keys must be unique")
        self._publishes[key] = _Publish(key, mode, topic, _canonical(payload), self.tick())
        return key

    def acked(self, key: str, message_id: str) -> None:
        publish = self._publishes[key]
        publish.outcome = Outcome.ACKED
        publish.message_id = message_id
        self._acked_count += 1

    def refused(self, key: str, error: str) -> None:
        publish = self._publishes[key]
        publish.outcome = Outcome.REFUSED
        publish.error = error

    def outcome(self, key: str) -> Outcome:
        return self._publishes[key].outcome

    # -- deliveries ------------------------------------------------------------------

    def delivered(self, reader: Reader, payload: Any, message_id: str) -> str | None:
        """``reader`` received ``payload`` as ``message_id``; returns its key (None: not
        a message of this history)."""
        now = self.tick()
        key = self._key_of(payload)
        publish = self._publishes.get(key) if key is not None else None
        if publish is None or publish.mode is not reader.mode or publish.topic != reader.topic:
            self._problem(reader, "unexpected", f"{message_id} {payload!r:.80}")
            return None
        assert key is not None
        if publish.outcome is Outcome.REFUSED:
            self._problem(reader, "refused_delivered", f"{key} ({publish.error})")
        if _canonical(payload) != publish.canonical:
            self._problem(reader, "mismatched", f"{key}: payload {payload!r:.80}")
        seen = self._seen[reader.key].setdefault(key, _Seen())
        expected_id = publish.message_id or seen.message_id
        if expected_id is not None and message_id != expected_id:
            self._problem(reader, "mismatched", f"{key}: id {message_id}, expected {expected_id}")
        if publish.message_id is None:
            seen.message_id = seen.message_id or message_id
        if seen.first_consumed is not None and not reader.acked_may_return:
            self._problem(reader, "returned_after_ack", f"{key} ({message_id})")
        seen.deliveries += 1
        if reader.auto_ack:
            self._consume(seen, now)
        return key

    def ack_sent(self, reader: Reader, key: str) -> None:
        """The consumer sent an ack for ``key``; its reply may never come."""
        self._acks_sent.add((reader.key, key))

    def ack_refused(self, reader: Reader, key: str) -> None:
        """The broker answered the consumer's ack of ``key`` with an error."""
        self._acks_sent.discard((reader.key, key))

    def consumed(self, reader: Reader, key: str) -> None:
        """The broker confirmed the consumer's ack of ``key``."""
        self._acks_sent.discard((reader.key, key))
        self._consume(self._seen[reader.key][key], self.tick())

    @staticmethod
    def _consume(seen: _Seen, now: int) -> None:
        seen.consumptions += 1
        if seen.first_consumed is None:
            seen.first_consumed = now

    def _problem(self, reader: Reader, kind: str, detail: str) -> None:
        self._stray_counts[kind] += 1
        examples = self._strays.setdefault(kind, [])
        if len(examples) < _EXAMPLES:
            examples.append(f"{reader.name}: {detail}")

    # -- checking --------------------------------------------------------------------

    def check(self) -> Report:
        """Classify the history (see the module docstring). Call after the drain."""
        publishes = self._publishes.values()
        outcomes = [p.outcome for p in publishes]
        examples: dict[str, list[str]] = {k: list(v) for k, v in self._strays.items()}
        lost = duplicated = delivered = consumed = most_consumed = 0
        by_destination: dict[tuple[Mode, str], list[_Publish]] = {}
        for publish in publishes:
            by_destination.setdefault((publish.mode, publish.topic), []).append(publish)
        consumed_keys: set[str] = set()
        for reader in self._readers.values():
            seen = self._seen[reader.key]
            for key, record in seen.items():
                delivered += record.deliveries
                consumed += record.consumptions
                if record.consumptions:
                    consumed_keys.add(key)
                most_consumed = max(most_consumed, record.consumptions)
                if record.consumptions > 1:
                    duplicated += record.consumptions - 1
            for publish in by_destination.get((reader.mode, reader.topic), []):
                if publish.outcome is not Outcome.ACKED or publish.invoked <= reader.since:
                    continue
                record_ = seen.get(publish.key)
                if (reader.key, publish.key) in self._acks_sent:
                    continue  # its ack may have been applied: either way is fine
                if record_ is None or not record_.consumptions:
                    lost += 1
                    if len(examples.setdefault("lost", [])) < _EXAMPLES:
                        what = "delivered, never consumed" if record_ else "never delivered"
                        examples["lost"].append(
                            f"{reader.name}: {publish.key} ({publish.message_id}; {what})"
                        )
        recovered = sum(
            1 for p in publishes if p.outcome is Outcome.UNKNOWN and p.key in consumed_keys
        )
        return Report(
            attempted=len(outcomes),
            acked=outcomes.count(Outcome.ACKED),
            refused=outcomes.count(Outcome.REFUSED),
            unknown=outcomes.count(Outcome.UNKNOWN),
            delivered=delivered,
            consumed=consumed,
            ack_unknown=len(self._acks_sent),
            lost=lost,
            duplicated=duplicated,
            most_consumed=most_consumed,
            recovered=recovered,
            unexpected=self._stray_counts["unexpected"],
            refused_delivered=self._stray_counts["refused_delivered"],
            mismatched=self._stray_counts["mismatched"],
            returned_after_ack=self._stray_counts["returned_after_ack"],
            examples={k: tuple(v) for k, v in examples.items() if v},
        )
