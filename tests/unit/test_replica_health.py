"""A replica's health state: the probes' verdict, ejection on top of it, decided in the core."""

from __future__ import annotations

from proxy.core.queue import Waiter
from proxy.core.replicas import Replica
from proxy.core.scheduler import Scheduler


def make() -> Scheduler:
    return Scheduler([Replica("a", "http://a", 1)], max_queue=10)


def test_ejection_wins_over_the_probes_and_is_lifted_through_the_scheduler() -> None:
    s = make()
    r = s.replicas[0]
    assert (r.health, r.healthy, r.ejected_until) == ("healthy", True, None)
    assert s.set_ejected(r, 1000.0) == ()
    assert (r.health, r.healthy, r.ejected_until) == ("ejected", False, 1000.0)
    assert repr(r) == "<Replica a 0/1 ejected>"
    waiter = s.submit(lambda _: True)
    assert isinstance(waiter, Waiter)  # an ejected replica takes no work
    assert s.set_healthy(r, True) == ()  # a passing probe alone does not lift the ejection
    (grant,) = s.set_ejected(r, None)  # lifted: the waiter is served at that very moment
    assert grant.waiter is waiter and r.health == "healthy"
    grant.lease.release()
    assert s.idle()


def test_lifted_while_its_probes_fail_it_stays_out_as_unhealthy() -> None:
    s = make()
    r = s.replicas[0]
    s.set_ejected(r, 1000.0)
    s.set_healthy(r, False)
    assert r.health == "ejected"
    assert s.set_ejected(r, None) == ()
    assert (r.health, r.healthy) == ("unhealthy", False)


def test_a_replica_may_start_unhealthy() -> None:
    r = Replica("a", "http://a", 1, healthy=False)
    assert (r.health, r.healthy, r.up) == ("unhealthy", False, False)
    s = make()
    s.add_replica("b", "http://b", 1, healthy=False)
    b = s.replica("b")
    assert b is not None and b.health == "unhealthy" and not s.replicas[1].healthy
