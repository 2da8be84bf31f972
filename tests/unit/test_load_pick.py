"""Which replica a gateway picks: the one with the most room by its freshest load reading,
power-of-two-choices among equals, the local least-loaded pick when a reading is unknown; and
a request a replica rejected prefers another one. No I/O, injected clock and random source."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.core.load import LoadBoard, Reading, parse_headers, parse_json
from proxy.core.replicas import Replica
from proxy.core.scheduler import Lease, Scheduler, Waiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Rng:
    """Returns the values it is given, in order (then 0.0)."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def __call__(self) -> float:
        return self.values.pop(0) if self.values else 0.0


def make(*caps: int, clock: Clock | None = None, rng: Rng | None = None,
         max_age_s: float = 10.0) -> Scheduler:
    clock = clock if clock is not None else Clock()
    replicas = [Replica(f"r{i}", f"http://127.0.0.1:{9000 + i}", c) for i, c in enumerate(caps)]
    return Scheduler(replicas, 100, clock=clock, rng=rng if rng is not None else Rng(),
                     load=LoadBoard(max_age_s, clock))


@pytest.fixture
def made() -> Iterator[list[Scheduler]]:
    schedulers: list[Scheduler] = []
    yield schedulers
    for s in schedulers:
        assert s.idle(), f"leak: {s!r}"


def take(s: Scheduler, **kwargs: object) -> Lease:
    got = s.submit(lambda _: True, **kwargs)  # type: ignore[arg-type]
    assert isinstance(got, Lease)
    return got


def names(leases: list[Lease]) -> list[str]:
    return [lease.replica.name for lease in leases]


def release(leases: list[Lease]) -> None:
    for lease in leases:
        lease.release()


def test_a_rejected_request_prefers_another_replica(made: list[Scheduler]) -> None:
    s = make(4, 1)
    made.append(s)
    r0 = s.replicas[0]
    # r0 would be first (tie, round-robin start), but the request was just rejected there.
    first = take(s, avoid=r0)
    assert first.replica.name == "r1"
    # Only the avoided replica has room (r1 is full): it is still used (preferred, not
    # excluded).
    again = take(s, avoid=r0)
    assert again.replica.name == "r0"
    release([first, again])


def test_a_resend_behind_others_waits_at_the_head_for_any_replica(
    made: list[Scheduler],
) -> None:
    s = make(1, 1)
    made.append(s)
    a, b = take(s), take(s)
    granted: list[Lease] = []

    def keep(lease: object) -> bool:
        assert isinstance(lease, Lease)
        granted.append(lease)
        return True

    s.submit(keep)  # someone waits already
    resend = s.submit(keep, front=True, avoid=s.replicas[0])
    assert isinstance(resend, Waiter) and s.position(resend) == 1
    a.release()  # the first slot to free goes to the head, whichever replica it is on
    assert names(granted) == ["r0"]
    b.release()
    release(granted)


def test_the_replica_with_the_most_room_wins(made: list[Scheduler]) -> None:
    clock = Clock()
    s = make(8, 8, 8, clock=clock)
    made.append(s)
    r0, r1, r2 = s.replicas
    s.load.record(r0, Reading(in_flight=4, max_concurrency=4, queue_depth=3))  # room -3
    s.load.record(r1, Reading(in_flight=1, max_concurrency=4, queue_depth=0))  # room 3
    s.load.record(r2, Reading(in_flight=2, max_concurrency=4, queue_depth=0))  # room 2
    first = take(s)
    assert first.replica is r1
    # What this gateway sent since the reading counts against it: r1 3-1 = 2 ties r2.
    second = take(s)
    assert second.replica in (r1, r2)
    leases = [first, second, *(take(s) for _ in range(3))]
    # r1 and r2 are filled to 0 room before r0 (at -3) gets anything.
    assert names(leases).count("r0") == 0
    release(leases)


def test_power_of_two_choices_among_equals(made: list[Scheduler]) -> None:
    # Sampled: index int(0.0 * 3) = 0 -> r0, then int(0.99 * 2) = 1 of the others -> r2.
    s = make(8, 8, 8, rng=Rng(0.0, 0.99))
    made.append(s)
    r0, r1, r2 = s.replicas
    for r in (r0, r1, r2):
        s.load.record(r, Reading(in_flight=0, max_concurrency=4, queue_depth=0))
    # Both sampled are idle locally: the first sampled. Round-robin would give r0 too, so
    # sample the other way round: r2 then r0.
    lease = take(s)
    assert lease.replica is r0
    s3 = make(8, 8, 8, rng=Rng(0.99, 0.0))
    made.append(s3)
    for r in s3.replicas:
        s3.load.record(r, Reading(in_flight=0, max_concurrency=4, queue_depth=0))
    other = take(s3)
    assert other.replica is s3.replicas[2]  # int(0.99 * 3) = 2: r2, then r0; r2 first
    release([lease, other])


def test_power_of_two_choices_prefers_the_locally_less_loaded_of_the_two(
    made: list[Scheduler],
) -> None:
    clock = Clock()
    s = make(8, 8, 8, clock=clock, rng=Rng(0.0, 0.0))
    made.append(s)
    a0, a1, a2 = s.replicas
    mine = take(s)  # no readings yet: the local pick, a0
    assert mine.replica is a0
    for r in (a0, a1, a2):
        # a0's reading already counts our request: its room is the same as the others'.
        s.load.record(r, Reading(in_flight=1 if r is a0 else 0, max_concurrency=5,
                                 queue_depth=0))
    # Sampled a0 (index 0) and a1 (index 0 of the rest): a1 is idle locally, a0 is not.
    lease = take(s)
    assert lease.replica is a1
    release([mine, lease])


def test_a_stale_reading_is_unknown_and_the_local_pick_applies(made: list[Scheduler]) -> None:
    clock = Clock()
    s = make(4, 4, clock=clock, max_age_s=10.0)
    made.append(s)
    r0, r1 = s.replicas
    s.load.record(r0, Reading(in_flight=4, max_concurrency=4, queue_depth=9))
    s.load.record(r1, Reading(in_flight=0, max_concurrency=4, queue_depth=0))
    assert take(s).replica is r1 and s.replicas[1].in_flight == 1
    s.replicas[1].in_flight -= 1  # (give the slot back without the lease, for the next pick)
    clock.now += 10.0  # exactly the age limit: still known
    assert s.load.room(r0) is not None
    clock.now += 0.001  # older than the limit: unknown
    assert s.load.room(r0) is None
    # r0's reading is unknown now: local least-loaded, ties round-robin (r0 next).
    lease = take(s)
    assert lease.replica is r0
    release([lease])


def test_one_unknown_reading_means_the_local_pick(made: list[Scheduler]) -> None:
    s = make(4, 4)
    made.append(s)
    r0, r1 = s.replicas
    s.load.record(r1, Reading(in_flight=4, max_concurrency=4, queue_depth=5))
    # r0 never sent a reading: the local pick (both idle; round-robin start r0).
    lease = take(s)
    assert lease.replica is r0
    release([lease])


def test_no_local_slot_no_pick_whatever_the_reading(made: list[Scheduler]) -> None:
    s = make(1, 1)
    made.append(s)
    r0 = s.replicas[0]
    a = take(s)
    b = take(s)
    s.load.record(r0, Reading(in_flight=0, max_concurrency=100, queue_depth=0))
    waiter = s.submit(lambda _: True)
    assert isinstance(waiter, Waiter)  # the local cap still holds
    s.withdraw(waiter)
    a.release()
    b.release()


def test_a_removed_replica_is_forgotten(made: list[Scheduler]) -> None:
    s = make(4, 4)
    made.append(s)
    r1 = s.replicas[1]
    s.load.record(r1, Reading(in_flight=0, max_concurrency=4, queue_depth=0))
    assert s.remove_replica(r1)
    assert s.load.room(r1) is None
    assert "r1" not in repr(s.load)


def test_readings_from_headers_and_json() -> None:
    headers = {"X-Batchgate-In-Flight": "3", "X-Batchgate-Max-Concurrency": "4",
               "X-Batchgate-Queue-Depth": "7"}
    assert parse_headers(headers) == Reading(3, 4, 7)
    assert parse_headers({}) is None
    assert parse_headers({**headers, "X-Batchgate-Queue-Depth": "-1"}) is None
    assert parse_headers({**headers, "X-Batchgate-In-Flight": "x"}) is None
    assert parse_json({"in_flight": 3, "max_concurrency": 4, "queue_depth": 7}) == Reading(3, 4, 7)
    assert parse_json({"in_flight": 3, "max_concurrency": 4}) is None
    assert parse_json({"in_flight": True, "max_concurrency": 4, "queue_depth": 0}) is None
    assert parse_json([1, 2, 3]) is None
    assert Reading(3, 4, 7).room == -6
