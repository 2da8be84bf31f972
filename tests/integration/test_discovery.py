"""Discovery against a local DNS server (tests/integration/fakedns.py) whose records change.

The fake replicas listen on distinct loopback addresses (127.0.0.2, 127.0.0.3, ...: Linux
routes all of 127/8 to lo) on one port, as the pods of a headless Service do. The discovery
loop's sleep is a FakeTime the test advances, so no test waits for ``interval_s``; probes run
on real time (a new replica is probed the moment it is added).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Config, DiscoveryConfig, ReplicaConfig
from proxy.control.discovery import DnsLookup, LookupFailed
from proxy.control.reload import REFUSED, SUCCESS
from proxy.edge.keys import DISCOVERY, METRICS, RELOADER, UPSTREAMS
from tests.integration.conftest import (
    BOUND_S,
    FakeReplica,
    FakeTime,
    Proxy,
    make_config,
    until,
)
from tests.integration.fakedns import DROP, SERVFAIL, FakeDns

Factory = Callable[..., Any]
NAME = "vllm-headless.llm.test"


@pytest.fixture
async def dns_server() -> AsyncIterator[FakeDns]:
    server = FakeDns()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def pods() -> AsyncIterator[Callable[..., Any]]:
    """Factory: one fake replica per address, all on one port (a headless Service's pods)."""
    started: list[FakeReplica] = []
    port: list[int] = []

    async def start(address: str) -> FakeReplica:
        replica = FakeReplica(address)
        runner = web.AppRunner(replica.app(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=1)
        await runner.setup()
        await web.TCPSite(runner, address, port[0]).start()
        replica.runner = runner
        replica.url = f"http://[{address}]:{port[0]}" if ":" in address else (
            f"http://{address}:{port[0]}")
        started.append(replica)
        return replica

    async def make(*addresses: str) -> list[FakeReplica]:
        for attempt in range(5):
            if not port:
                probe = socket.socket()
                probe.bind((addresses[0] if ":" not in addresses[0] else "127.0.0.1", 0))
                port.append(probe.getsockname()[1])
                probe.close()
            try:
                return [await start(address) for address in addresses]
            except OSError as err:  # the port is taken on another address: another port
                if err.errno != errno.EADDRINUSE or attempt == 4 or len(started) > 0:
                    raise
                port.clear()
        raise AssertionError("unreachable")

    make.port = port  # type: ignore[attr-defined]
    yield make
    for replica in started:
        replica.gate.set()
        assert replica.runner is not None
        await replica.runner.cleanup()


def discovery_config(dns: FakeDns, port: int, *static: tuple[str, str, int], cap: int = 2,
                     interval_s: float = 5.0, **more: Any) -> Config:
    entry = DiscoveryConfig(dns=NAME, port=port, max_concurrency=cap, name_prefix="vllm",
                            interval_s=interval_s, nameservers=(dns.nameserver,))
    return dataclasses.replace(make_config(*static, **more), discovery=(entry,))


def names(p: Proxy) -> list[str]:
    return [r.name for r in p.scheduler.replicas]


def healthy(p: Proxy) -> list[str]:
    return [r.name for r in p.scheduler.replicas if r.takes_work]


def pool_names(p: Proxy) -> set[str]:
    return {pool.name for pool in p.app[UPSTREAMS].pools()}


async def lookup_round(p: Proxy, clock: FakeTime) -> None:
    """Let the loop's next lookup run and be applied (or fail)."""
    discovery = p.app[DISCOVERY]
    before = sum(discovery.lookups.values()) + errors(p)
    await until(lambda: clock._sleepers, "the discovery loop asleep")
    clock.advance(6.0)  # past 5 s + 10 % jitter
    await until(lambda: sum(discovery.lookups.values()) + errors(p) > before,
                "the next lookup applied")


def errors(p: Proxy) -> float:
    return p.metric("batchgate_discovery_errors_total", dns=NAME)


async def post(client: aiohttp.ClientSession, p: Proxy, payload: dict[str, Any]
               ) -> tuple[int, dict[str, Any]]:
    async with client.post(p.url + "/v1/completions", json=payload) as r:
        return r.status, await r.json()


async def test_records_added_and_removed_while_traffic_runs(
    proxy: Factory, pods: Factory, dns_server: FakeDns, client: aiohttp.ClientSession
) -> None:
    a, b, c = await pods("127.0.0.2", "127.0.0.3", "127.0.0.4")
    dns_server.set(NAME, "127.0.0.2")
    clock = FakeTime()
    p: Proxy = await proxy(discovery_config(dns_server, pods.port[0]),
                           discovery_timing=clock.timing())
    await until(lambda: healthy(p) == ["vllm-127.0.0.2"], "a found and probed")
    assert p.scheduler.replica("vllm-127.0.0.2").url == a.url  # type: ignore[union-attr]
    assert errors(p) == 0.0  # exported at 0 from startup

    # a's two slots held: everything else queues until discovery finds more.
    held = [asyncio.create_task(post(client, p, {"hold": True})) for _ in range(2)]
    await until(lambda: a.in_flight == 2, "a full")
    answers: list[tuple[int, dict[str, Any]]] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            answers.append(await post(client, p, {"delay_ms": 2}))

    workers = [asyncio.create_task(traffic()) for _ in range(6)]
    await until(lambda: p.scheduler.queue_depth == 6, "the traffic queued behind a")

    dns_server.set(NAME, "127.0.0.2", "127.0.0.3", "127.0.0.4")
    await lookup_round(p, clock)
    assert names(p) == ["vllm-127.0.0.2", "vllm-127.0.0.3", "vllm-127.0.0.4"]
    await until(lambda: len(healthy(p)) == 3, "b and c probed in")
    await until(lambda: b.completed >= 5 and c.completed >= 5, "b and c serving the traffic")

    # a leaves DNS while it holds two requests: no new work, it finishes them, then goes.
    dns_server.set(NAME, "127.0.0.3", "127.0.0.4")
    await lookup_round(p, clock)
    gone = p.scheduler.replica("vllm-127.0.0.2")
    assert gone is not None and gone.state == "draining"
    async with client.get(p.url + "/admin/replicas") as r:
        entries = {e["name"]: e for e in await r.json()}
    assert entries["vllm-127.0.0.2"]["draining"] is True
    assert entries["vllm-127.0.0.3"]["url"] == b.url
    arrivals = a.arrivals
    served = b.completed + c.completed
    await until(lambda: b.completed + c.completed >= served + 20, "more traffic served")
    assert a.arrivals == arrivals == 2  # nothing new went to a
    assert not any(task.done() for task in held)
    a.gate.set()
    for status, body in await asyncio.wait_for(asyncio.gather(*held), BOUND_S):
        assert (status, body["replica"]) == (200, "127.0.0.2")
    await until(lambda: "vllm-127.0.0.2" not in pool_names(p), "a retired")
    assert names(p) == ["vllm-127.0.0.3", "vllm-127.0.0.4"]
    samples = [s for family in p.app[METRICS].registry.collect() for s in family.samples]
    assert not [s for s in samples if s.labels.get("replica") == "vllm-127.0.0.2"]

    stop.set()
    await asyncio.wait_for(asyncio.gather(*workers), BOUND_S)
    # Nothing lost: every request answered, by a replica, and none aborted.
    assert answers and all(status == 200 for status, _ in answers)
    assert len(answers) == b.completed + c.completed
    assert (a.aborted, b.aborted, c.aborted) == (0, 0, 0)
    assert errors(p) == 0.0


@pytest.mark.parametrize("mode", [SERVFAIL, DROP])
async def test_a_failed_lookup_keeps_the_set_and_is_counted(
    proxy: Factory, pods: Factory, dns_server: FakeDns, client: aiohttp.ClientSession,
    mode: str,
) -> None:
    await pods("127.0.0.2")
    dns_server.set(NAME, "127.0.0.2")
    clock = FakeTime()
    # interval_s bounds each lookup's time (DROP: it times out after 0.2 s, not 5).
    p: Proxy = await proxy(discovery_config(dns_server, pods.port[0], interval_s=0.2),
                           discovery_timing=clock.timing())
    await until(lambda: healthy(p) == ["vllm-127.0.0.2"], "a found and probed")

    dns_server.mode = mode
    await lookup_round(p, clock)
    assert errors(p) == 1.0
    assert healthy(p) == ["vllm-127.0.0.2"]  # the last known set stays, and serves
    status, body = await post(client, p, {})
    assert (status, body["replica"]) == (200, "127.0.0.2")

    # Still failing: counted again. Answering again: the records apply again.
    await lookup_round(p, clock)
    assert errors(p) == 2.0
    dns_server.mode = "answer"
    dns_server.set(NAME)
    await lookup_round(p, clock)
    assert errors(p) == 2.0
    await until(lambda: names(p) == [], "a gone once DNS answered without it")


@pytest.mark.parametrize("answer", ["nxdomain", "no records"])
async def test_no_address_in_dns_empties_the_set_and_a_returning_one_comes_back(
    proxy: Factory, pods: Factory, dns_server: FakeDns, client: aiohttp.ClientSession,
    answer: str,
) -> None:
    """Scale to zero: a headless Service without ready pods answers NXDOMAIN or nothing."""
    (a,) = await pods("127.0.0.2")
    dns_server.set(NAME, "127.0.0.2")
    clock = FakeTime()
    p: Proxy = await proxy(discovery_config(dns_server, pods.port[0], queue_timeout_s=20),
                           discovery_timing=clock.timing())
    await until(lambda: healthy(p) == ["vllm-127.0.0.2"], "a found and probed")
    probes_before = a.health_hits

    if answer == "nxdomain":
        del dns_server.records[NAME]
    else:
        dns_server.set(NAME)
    await lookup_round(p, clock)
    assert names(p) == [] and errors(p) == 0.0  # an answer, not a failure
    await until(lambda: pool_names(p) == set(), "a retired")

    # A request now waits for a replica (queue.timeout_s), and the pod coming back serves it.
    waiting = asyncio.create_task(post(client, p, {}))
    await until(lambda: p.scheduler.queue_depth == 1, "the request queued")
    dns_server.set(NAME, "127.0.0.2")
    await lookup_round(p, clock)
    status, body = await asyncio.wait_for(waiting, BOUND_S)
    assert (status, body["replica"]) == (200, "127.0.0.2")
    assert a.health_hits > probes_before  # probed again before it took work


async def test_a_new_address_takes_no_work_before_a_passing_probe(
    proxy: Factory, pods: Factory, dns_server: FakeDns, client: aiohttp.ClientSession
) -> None:
    a, b = await pods("127.0.0.2", "127.0.0.3")
    b.health_script = asyncio.Queue()  # b's first probe waits for the test
    dns_server.set(NAME, "127.0.0.2")
    clock = FakeTime()
    # assume_healthy_at_start (the default, true) is for the file's replicas, not found ones.
    p: Proxy = await proxy(discovery_config(dns_server, pods.port[0], cap=1),
                           discovery_timing=clock.timing())
    await until(lambda: healthy(p) == ["vllm-127.0.0.2"], "a found and probed")
    held = asyncio.create_task(post(client, p, {"hold": True}))
    await until(lambda: a.in_flight == 1, "a full")
    dns_server.set(NAME, "127.0.0.2", "127.0.0.3")
    await lookup_round(p, clock)
    assert names(p) == ["vllm-127.0.0.2", "vllm-127.0.0.3"]
    queued = asyncio.create_task(post(client, p, {}))
    await until(lambda: p.scheduler.queue_depth == 1, "a request queued")
    await until(lambda: b.health_hits == 1, "b's first probe out")
    assert b.arrivals == 0 and healthy(p) == ["vllm-127.0.0.2"]
    b.health_script.put_nowait(200)
    status, body = await asyncio.wait_for(queued, BOUND_S)
    assert (status, body["replica"]) == (200, "127.0.0.3")
    a.gate.set()
    assert (await asyncio.wait_for(held, BOUND_S))[0] == 200


async def test_ipv6_addresses_are_bracketed_in_the_url(
    proxy: Factory, pods: Factory, dns_server: FakeDns, client: aiohttp.ClientSession
) -> None:
    await pods("::1")
    dns_server.set(NAME, "::1")
    clock = FakeTime()
    p: Proxy = await proxy(discovery_config(dns_server, pods.port[0]),
                           discovery_timing=clock.timing())
    await until(lambda: healthy(p) == ["vllm-::1"], "::1 found and probed")
    replica = p.scheduler.replica("vllm-::1")
    assert replica is not None and replica.url == f"http://[::1]:{pods.port[0]}"
    status, body = await post(client, p, {})
    assert (status, body["replica"]) == (200, "::1")


async def test_discovery_beside_replicas_and_through_reloads(
    proxy: Factory, pods: Factory, replicas: Factory, dns_server: FakeDns,
    client: aiohttp.ClientSession,
) -> None:
    (a,) = await pods("127.0.0.2")
    static: FakeReplica = await replicas("static")
    dns_server.set(NAME, "127.0.0.2")
    clock = FakeTime()
    config = discovery_config(dns_server, pods.port[0], ("static", static.url, 1))
    p: Proxy = await proxy(config, discovery_timing=clock.timing())
    await until(lambda: healthy(p) == ["static", "vllm-127.0.0.2"], "a found beside static")
    reloader = p.app[RELOADER]

    # A reload that leaves discovery as it is keeps what discovery found, though the file
    # does not list it (and `replicas` changes: the static replica's cap).
    reloader.load = lambda: dataclasses.replace(
        config, replicas=(ReplicaConfig("static", 2, static.url),))
    result = await reloader.reload("test")
    assert (result.result, result.message) == (SUCCESS, "static max_concurrency 1->2")
    assert healthy(p) == ["static", "vllm-127.0.0.2"]

    # A file replica cannot take a discovered replica's name.
    taken = dataclasses.replace(config, replicas=(
        ReplicaConfig("static", 2, static.url), ReplicaConfig("vllm-127.0.0.2", 1, static.url)))
    reloader.load = lambda: taken
    result = await reloader.reload("test")
    assert result.result == REFUSED
    assert "replicas[1] (vllm-127.0.0.2) has the name of a replica found by discovery" in (
        result.message)

    # A reload that changes discovery: its replicas follow (a new cap, at once).
    entry = dataclasses.replace(config.discovery[0], max_concurrency=5)
    reloader.load = lambda: dataclasses.replace(config, discovery=(entry,))
    result = await reloader.reload("test")
    assert result.ok and "changed: discovery" in result.message
    await until(lambda: p.app[DISCOVERY].lookups.get("vllm", 0) >= 2, "looked up again")
    assert p.metric("batchgate_replica_max_concurrency", replica="vllm-127.0.0.2") == 5.0

    # A reload without discovery: what it found takes no new work and drains away.
    held = asyncio.create_task(post(client, p, {"hold": True, "n": 1}))
    await until(lambda: a.in_flight + static.in_flight == 1, "one request held")
    reloader.load = lambda: dataclasses.replace(config, discovery=())
    result = await reloader.reload("test")
    assert result.ok
    assert healthy(p) == ["static"]
    assert "batchgate_discovery_errors_total" not in {
        s.name for f in p.app[METRICS].registry.collect() for s in f.samples}
    a.gate.set()
    static.gate.set()
    assert (await asyncio.wait_for(held, BOUND_S))[0] == 200
    await until(lambda: names(p) == ["static"], "the found replica gone")


async def test_an_address_whose_name_is_in_use_waits_until_it_is_free(
    proxy: Factory, pods: Factory, replicas: Factory, dns_server: FakeDns,
) -> None:
    (a,) = await pods("127.0.0.2")
    other: FakeReplica = await replicas("other")
    dns_server.set(NAME, "127.0.0.2")
    clock = FakeTime()
    config = discovery_config(dns_server, pods.port[0], ("vllm-127.0.0.2", other.url, 1))
    p: Proxy = await proxy(config, discovery_timing=clock.timing())
    await until(lambda: p.app[DISCOVERY].lookups.get("vllm") == 1, "first lookup")
    assert names(p) == ["vllm-127.0.0.2"]
    assert p.scheduler.replica("vllm-127.0.0.2").url == other.url  # type: ignore[union-attr]

    reloader = p.app[RELOADER]
    reloader.load = lambda: dataclasses.replace(config, replicas=())
    assert (await reloader.reload("test")).ok
    await until(lambda: reloader.name_free("vllm-127.0.0.2"), "the file's replica retired")
    await lookup_round(p, clock)
    replica = p.scheduler.replica("vllm-127.0.0.2")
    assert replica is not None and replica.url == a.url


async def test_a_large_answer_comes_over_tcp(dns_server: FakeDns) -> None:
    addresses = [f"127.0.1.{i}" for i in range(1, 121)]  # > 1232 bytes of answer
    dns_server.set(NAME, *addresses)
    entry = DiscoveryConfig(dns=NAME, port=8000, max_concurrency=1, name_prefix="vllm",
                            nameservers=(dns_server.nameserver,))
    lookup = DnsLookup()
    assert await lookup(entry) == frozenset(addresses)
    assert ("tcp", NAME, "A") in dns_server.queries
    dns_server.mode = SERVFAIL
    with pytest.raises(LookupFailed, match="A: "):
        await lookup(entry)


async def test_an_address_back_while_its_replica_drains_returns_once_that_one_is_gone(
    proxy: Factory, pods: Factory, dns_server: FakeDns, client: aiohttp.ClientSession
) -> None:
    (a,) = await pods("127.0.0.2")
    dns_server.set(NAME, "127.0.0.2")
    clock = FakeTime()
    p: Proxy = await proxy(discovery_config(dns_server, pods.port[0]),
                           discovery_timing=clock.timing())
    await until(lambda: healthy(p) == ["vllm-127.0.0.2"], "a found and probed")
    held = asyncio.create_task(post(client, p, {"hold": True}))
    await until(lambda: a.in_flight == 1, "a request held on a")

    dns_server.set(NAME)
    await lookup_round(p, clock)
    draining = p.scheduler.replica("vllm-127.0.0.2")
    assert draining is not None and draining.state == "draining"
    # Back in DNS while the old one still finishes: the name is in use, so not yet.
    dns_server.set(NAME, "127.0.0.2")
    await lookup_round(p, clock)
    assert p.scheduler.replica("vllm-127.0.0.2") is draining
    assert draining.state == "draining"

    a.gate.set()
    assert (await asyncio.wait_for(held, BOUND_S))[0] == 200
    reloader = p.app[RELOADER]
    await until(lambda: reloader.name_free("vllm-127.0.0.2"), "the old one retired")
    await lookup_round(p, clock)
    back = p.scheduler.replica("vllm-127.0.0.2")
    assert back is not None and back is not draining
    await until(lambda: back.takes_work, "the new one probed in")
    assert pool_names(p) == {"vllm-127.0.0.2"}
    status, body = await post(client, p, {})
    assert (status, body["replica"]) == (200, "127.0.0.2")


async def test_a_name_is_free_only_once_its_replica_is_retired(
    proxy: Factory, replicas: Factory
) -> None:
    """Between the scheduler dropping a replica and its retirement (pools, probes, series:
    the next loop turn), a new replica of that name would have its pools closed by it."""
    s: FakeReplica = await replicas("s")
    p: Proxy = await proxy(make_config(("s", s.url, 1), ("t", s.url, 1)))
    reloader = p.app[RELOADER]
    reloader.remove_replica("s", "removed by the test")  # holds nothing: dropped at once
    assert p.scheduler.replica("s") is None
    assert not reloader.name_free("s")
    await until(lambda: reloader.name_free("s"), "s retired")
    assert pool_names(p) == {"t"}


async def test_a_dual_stack_name_gives_a_replica_per_address_of_either_family(
    proxy: Factory, pods: Factory, dns_server: FakeDns, client: aiohttp.ClientSession
) -> None:
    await pods("127.0.0.2", "::1")
    dns_server.set(NAME, "::1", "127.0.0.2")
    clock = FakeTime()
    p: Proxy = await proxy(discovery_config(dns_server, pods.port[0]),
                           discovery_timing=clock.timing())
    await until(lambda: len(healthy(p)) == 2, "both found and probed")
    assert names(p) == ["vllm-127.0.0.2", "vllm-::1"]  # IPv4 first, then IPv6
    answered = {(await post(client, p, {"i": i}))[1]["replica"] for i in range(4)}
    assert answered == {"127.0.0.2", "::1"}


async def test_a_bug_in_a_lookup_is_counted_and_the_loop_carries_on(
    proxy: Factory, pods: Factory, dns_server: FakeDns, caplog: pytest.LogCaptureFixture
) -> None:
    await pods("127.0.0.2")
    dns_server.set(NAME, "127.0.0.2")
    real = DnsLookup()
    calls: list[DiscoveryConfig] = []

    async def lookup(entry: DiscoveryConfig) -> frozenset[str]:
        calls.append(entry)
        if len(calls) == 1:
            raise RuntimeError("lookup bug")
        return await real(entry)

    clock = FakeTime()
    p: Proxy = await proxy(discovery_config(dns_server, pods.port[0]), lookup=lookup,
                           discovery_timing=clock.timing())
    await until(lambda: p.metric("batchgate_internal_errors_total", where="discovery") == 1,
                "the bug counted")
    assert any("a bug" in r.getMessage() and r.exc_info for r in caplog.records)
    assert names(p) == [] and errors(p) == 0.0
    await lookup_round(p, clock)
    assert names(p) == ["vllm-127.0.0.2"]


async def test_without_nameservers_and_without_a_resolver_a_lookup_fails(tmp_path: Any) -> None:
    entry = DiscoveryConfig(dns=NAME, port=8000, max_concurrency=1, name_prefix="vllm")
    lookup = DnsLookup(resolv_conf=str(tmp_path / "resolv.conf"))  # no such file
    with pytest.raises(LookupFailed, match="no resolver"):
        await lookup(entry)
