"""Passive outlier ejection: a replica that passes its probe but fails real requests.

Real sockets; the ejection's clock and the probe loops run on a :class:`FakeTime`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.edge.keys import METRICS
from tests.integration.conftest import FakeReplica, FakeTime, Proxy, make_config, until

Factory = Callable[..., Any]


async def send(client: aiohttp.ClientSession, p: Proxy, times: int = 1) -> list[int]:
    codes = []
    for _ in range(times):
        async with client.post(p.url + "/v1/completions", json={}) as resp:
            await resp.read()
            codes.append(resp.status)
    return codes


async def fail_until_ejected(client: aiohttp.ClientSession, p: Proxy, r: FakeReplica,
                             failures: int) -> None:
    """Requests (alternating: two replicas, one slot each) until ``r`` has failed
    ``failures`` more; it is then out."""
    replica = p.scheduler.replica(r.name)
    assert replica is not None
    start = r.arrivals
    for _ in range(4 * failures):
        if r.arrivals == start + failures:
            break
        assert replica.health == "healthy", f"{r.name} out after {r.arrivals - start}"
        await send(client, p)
    await until(lambda: replica.health == "ejected", f"{r.name} ejected")
    assert r.arrivals == start + failures


async def test_failing_replica_is_ejected_then_returns_after_a_passing_probe(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    a.answer_status = 500  # its /health still says 200
    time = FakeTime()
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1)), timing=time.timing())
    replica = p.scheduler.replicas[0]
    registry = p.app[METRICS].registry
    for name in ("a", "b"):  # exported at 0 from startup, so increase() sees the first one
        assert registry.get_sample_value("batchgate_replica_ejections_total",
                                         {"replica": name}) == 0
        assert registry.get_sample_value("batchgate_replica_state",
                                         {"replica": name, "state": "ejected"}) == 0
    await send(client, p, 8)  # a gets four of them (ties go round-robin)
    assert (a.arrivals, replica.health) == (4, "healthy")
    await fail_until_ejected(client, p, a, 1)  # the fifth failure in a row
    assert replica.ejected_until == time.wall + 10
    assert p.metric("batchgate_replica_ejections_total", replica="a") == 1
    assert p.metric("batchgate_replica_ejections_total", replica="b") == 0
    assert p.metric("batchgate_replica_state", replica="a", state="ejected") == 1
    assert p.metric("batchgate_replica_healthy", replica="a") == 0
    async with client.get(p.url + "/admin/replicas") as r:  # what an operator sees
        shown = {e["name"]: (e["state"], e["ejected_until"]) for e in await r.json()}
    assert shown == {"a": ("ejected", time.wall + 10), "b": ("healthy", None)}
    before = a.arrivals
    assert await send(client, p, 6) == [200] * 6
    assert a.arrivals == before  # all of them to b

    a.answer_status = None
    time.advance(10)  # the ejection is over: probed at once, and the probe passes
    await until(lambda: replica.health == "healthy", "a back")
    assert replica.ejected_until is None
    await send(client, p, 2)
    assert a.arrivals == before + 1

    # Ejected again within the clean minute: twice as long.
    a.answer_status = 500
    await fail_until_ejected(client, p, a, 5)
    assert replica.ejected_until == time.wall + 20
    assert p.metric("batchgate_replica_ejections_total", replica="a") == 2


async def test_ejection_ends_only_when_a_probe_passes(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    a.answer_status = 500
    time = FakeTime()
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1),
                                       upstream={"eject_after": 2, "eject_s": 30}),
                           timing=time.timing())
    replica = p.scheduler.replicas[0]
    await until(lambda: p.health.probes(replica) == 1, "startup probe")
    await fail_until_ejected(client, p, a, 2)
    assert replica.ejected_until == time.wall + 30
    a.answer_status = None
    a.health_status = 503
    time.advance(30)
    await until(lambda: p.health.probes(replica) == 2, "probed when the ejection ended")
    assert replica.health == "ejected"  # the time is up, but its probe failed
    a.health_status = 200
    time.advance(66)  # the next regular probe
    await until(lambda: replica.health == "healthy", "a back on the next passing probe")


async def test_max_ejected_percent_keeps_half_the_replicas(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    a.answer_status = b.answer_status = 500
    # Were both ejected, requests would wait for a replica: a short queue timeout says so.
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1), queue_timeout_s=1),
                           timing=FakeTime().timing())
    assert await send(client, p, 30) == [500] * 30
    ejections = [p.metric("batchgate_replica_ejections_total", replica=n) for n in "ab"]
    assert sorted(ejections) == [0, 1]  # 50 % of two replicas: one
    assert sorted(r.health for r in p.scheduler.replicas) == ["ejected", "healthy"]


async def test_ejection_can_be_turned_off(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    a.answer_status = 500
    p: Proxy = await proxy(make_config(("a", a.url, 1), ("b", b.url, 1),
                                       upstream={"max_ejected_percent": 0}),
                           timing=FakeTime().timing())
    await send(client, p, 20)
    assert a.arrivals == 10 and p.scheduler.replicas[0].health == "healthy"


async def test_hang_ups_and_client_errors_do_not_count(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    p: Proxy = await proxy(make_config(("a", a.url, 1), upstream={"eject_after": 1,
                                                                   "max_ejected_percent": 100}),
                           timing=FakeTime().timing())
    for status in (400, 404, 429):
        async with client.post(p.url + "/v1/completions", json={"status": status}) as resp:
            assert resp.status == status
    assert p.scheduler.replicas[0].health == "healthy"
    async with client.post(p.url + "/v1/completions", json={"status": 503}) as resp:
        assert resp.status == 503
    await until(lambda: p.scheduler.replicas[0].health == "ejected", "one 5xx is enough here")
