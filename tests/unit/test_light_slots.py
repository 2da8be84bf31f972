"""The slot-free bound (proxy.edge.light.LightSlots): which replica a GET goes to, and when none."""

from __future__ import annotations

from proxy.core.replicas import DRAINING, Replica
from proxy.edge.light import LightSlots


def replicas(*names: str) -> tuple[Replica, ...]:
    return tuple(Replica(n, f"http://{n}:8000", 4, index=i) for i, n in enumerate(names))


def test_least_loaded_healthy_untried_replica_under_the_limit() -> None:
    a, b, c = rs = replicas("a", "b", "c")
    slots = LightSlots(limit=2)
    slots.take(a)
    slots.take(a)
    slots.take(b)
    assert slots.pick(rs, set()) is c
    c.healthy = False
    assert slots.pick(rs, set()) is b
    assert slots.pick(rs, {"b"}) is None  # a is at its limit, c is down
    assert repr(slots) == "<LightSlots a 2/2, b 1/2>"
    slots.give(a)
    assert slots.pick(rs, {"b"}) is a


def test_equal_loads_rotate_and_every_take_is_given_back() -> None:
    rs = replicas("a", "b")
    slots = LightSlots(limit=8)
    picked = [slots.pick(rs, set()) for _ in range(4)]
    assert [r.name for r in picked if r is not None] == ["a", "b", "a", "b"]
    for r in rs:
        slots.take(r)
    assert not slots.idle()
    for r in rs:
        slots.give(r)
    assert slots.idle() and repr(slots) == "<LightSlots idle>"


def test_a_draining_replica_gets_no_slot_free_request() -> None:
    """A replica being removed finishes what it holds and takes nothing new, GETs included."""
    a, b = rs = replicas("a", "b")
    slots = LightSlots(limit=2)
    a.state = DRAINING
    assert [slots.pick(rs, set()) for _ in range(3)] == [b, b, b]
    assert slots.pick(rs, {"b"}) is None
