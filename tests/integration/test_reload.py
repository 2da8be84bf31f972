"""Live reload in process: each change applied to a proxy that holds work on a fake replica's gate.

The proxy fixture checks, after every test, that no slot, waiter, handler, checked-out
connection or background task is left, so a reload that leaked or dropped work fails there too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import (
    Config,
    ConfigError,
    QueueConfig,
    ReplicaConfig,
    config_to_dict,
    load_config,
)
from proxy.control.reload import FAILED, INVALID, REFUSED, SUCCESS
from proxy.edge.keys import METRICS, RELOADER, UPSTREAMS
from proxy.observe.accesslog import AccessLog
from tests.integration.conftest import BOUND_S, FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]


def reload_to(p: Proxy, config: Config) -> None:
    """The next reload of ``p`` reads ``config`` (as if the file now said that)."""
    p.app[RELOADER].load = lambda: config


def with_replicas(config: Config, *replicas: tuple[FakeReplica, int]) -> Config:
    return dataclasses.replace(config, replicas=tuple(
        ReplicaConfig(name=r.name, url=r.url, max_concurrency=cap) for r, cap in replicas))


async def post(client: aiohttp.ClientSession, p: Proxy, payload: dict[str, Any]
               ) -> tuple[int, dict[str, Any]]:
    async with client.post(p.url + "/v1/completions", json=payload) as r:
        return r.status, await r.json()


def pool_names(p: Proxy) -> set[str]:
    return {pool.name for pool in p.app[UPSTREAMS].pools()}


async def test_added_replica_takes_queued_work_and_removed_one_finishes_then_goes(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    config = make_config(("a", a.url, 1))
    p: Proxy = await proxy(config)
    held = asyncio.create_task(post(client, p, {"hold": True}))
    await until(lambda: a.in_flight == 1, "a request in flight on a")
    queued = [asyncio.create_task(post(client, p, {"i": i})) for i in range(2)]
    await until(lambda: p.scheduler.queue_depth == 2, "two requests queued")
    assert p.metric("batchgate_upstream_errors_total", replica="a", kind="connect") == 0.0

    reload_to(p, with_replicas(config, (b, 2)))
    result = await p.app[RELOADER].reload("test")

    assert (result.result, result.message) == (SUCCESS, "+b; -a")
    # b took both waiters at once; a takes nothing new but keeps what it holds.
    answers = await asyncio.wait_for(asyncio.gather(*queued), BOUND_S)
    assert [(s, body["replica"]) for s, body in answers] == [(200, "b"), (200, "b")]
    assert not held.done() and a.in_flight == 1
    assert [r.name for r in p.scheduler.replicas] == ["a", "b"]  # a draining
    assert pool_names(p) == {"a", "b"}

    a.gate.set()
    status, body = await asyncio.wait_for(held, BOUND_S)
    assert (status, body["replica"]) == (200, "a")
    await until(lambda: pool_names(p) == {"b"}, "a's pools closed after its last exchange")
    assert [r.name for r in p.scheduler.replicas] == ["b"]
    # Every series of a is gone (counted ones included), b's exist from the reload on.
    samples = [s for family in p.app[METRICS].registry.collect() for s in family.samples]
    assert not [s for s in samples if s.labels.get("replica") == "a"]
    assert p.metric("batchgate_upstream_errors_total", replica="b", kind="connect") == 0.0
    assert p.metric("batchgate_requests_total", replica="b", route="/v1/completions",
                    code="200", tenant="none") == 2.0
    assert p.metric("batchgate_config_reloads_total", result="success") == 1.0
    assert (a.completed, a.aborted, b.completed) == (1, 0, 2)


async def test_lowered_cap_dispatches_nothing_new_until_in_flight_is_under_it(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    config = make_config(("a", a.url, 3))
    p: Proxy = await proxy(config)
    held = [asyncio.create_task(post(client, p, {"hold": True})) for _ in range(2)]
    await until(lambda: a.in_flight == 2, "two requests in flight on a")

    reload_to(p, with_replicas(config, (a, 1)))
    result = await p.app[RELOADER].reload("test")
    assert (result.result, result.message) == (SUCCESS, "a max_concurrency 3->1")
    assert p.metric("batchgate_replica_max_concurrency", replica="a") == 1.0

    # Under the old cap of 3 this one would go at once; under the new cap of 1, it waits.
    later = asyncio.create_task(post(client, p, {"i": 1}))
    await until(lambda: p.scheduler.queue_depth == 1, "the new request queued")
    assert a.arrivals == 2 and a.in_flight == 2  # the held work is not cut
    a.gate.set()
    for status, _ in await asyncio.wait_for(asyncio.gather(*held, later), BOUND_S):
        assert status == 200
    assert a.arrivals == 3 and a.peak == 2


async def test_raised_cap_dispatches_waiters_at_once(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    config = make_config(("a", a.url, 1))
    p: Proxy = await proxy(config)
    held = asyncio.create_task(post(client, p, {"hold": True}))
    await until(lambda: a.in_flight == 1, "one request in flight on a")
    waiting = [asyncio.create_task(post(client, p, {"hold": True})) for _ in range(2)]
    await until(lambda: p.scheduler.queue_depth == 2, "two requests queued")

    reload_to(p, with_replicas(config, (a, 3)))
    assert (await p.app[RELOADER].reload("test")).ok
    # Both waiters reach the replica while the first request is still held.
    await until(lambda: a.in_flight == 3, "the two waiters dispatched to a")
    assert p.scheduler.queue_depth == 0 and not held.done()
    assert p.app[UPSTREAMS].pools()[0].limit == 6  # the pool follows the cap
    a.gate.set()
    for status, _ in await asyncio.wait_for(asyncio.gather(held, *waiting), BOUND_S):
        assert status == 200


BAD = """\
replicas:
  - name: a
    url: http://127.0.0.1:9000
    max_concurrency: -3
"""


async def test_invalid_file_is_refused_counted_and_the_old_config_stays(
    tmp_path: Path, proxy: Factory, replicas: Factory, client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a: FakeReplica = await replicas("a")
    p: Proxy = await proxy(make_config(("a", a.url, 2)))
    path = tmp_path / "batchgate.yaml"
    path.write_text(BAD)
    p.app[RELOADER].load = lambda: load_config(path)
    loaded_at = p.metric("batchgate_config_last_reload_success_timestamp_seconds")
    assert loaded_at > 0  # set at startup, as Prometheus does
    assert p.metric("batchgate_config_reloads_total", result="failure") == 0.0

    result = await p.app[RELOADER].reload("test")

    startup_error = f"{path}: replicas[0].max_concurrency: must be an integer >= 1, got -3"
    assert (result.result, result.message) == (INVALID, startup_error)
    assert startup_error in caplog.text and "failed" in caplog.text
    assert p.metric("batchgate_config_reloads_total", result="failure") == 1.0
    assert p.metric("batchgate_config_reloads_total", result="success") == 0.0
    assert p.metric("batchgate_config_last_reload_success_timestamp_seconds") == loaded_at
    # The old config is in force: a still has its 2 slots and serves.
    assert p.metric("batchgate_replica_max_concurrency", replica="a") == 2.0
    assert (await post(client, p, {}))[0] == 200


async def test_host_or_port_change_refuses_the_whole_reload(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    config = make_config(("a", a.url, 2))
    p: Proxy = await proxy(config)
    # Besides the port and host, the file adds b and changes the queue: none of it applies.
    new = with_replicas(config, (a, 2), (b, 2))
    new = dataclasses.replace(
        new, server=dataclasses.replace(new.server, host="0.0.0.0", port=9999),
        queue=QueueConfig(max_size=5))
    reload_to(p, new)

    result = await p.app[RELOADER].reload("test")

    assert result.result == REFUSED
    assert result.message == ("reload refused, nothing applied: server.host, server.port "
                              "cannot change without a restart")
    assert [r.name for r in p.scheduler.replicas] == ["a"]
    assert p.scheduler.max_queue == config.queue.max_size
    assert p.metric("batchgate_config_reloads_total", result="failure") == 1.0
    assert (await post(client, p, {}))[1]["replica"] == "a"


async def test_a_replica_that_moves_must_change_its_name(
    proxy: Factory, replicas: Factory
) -> None:
    a: FakeReplica = await replicas("a")
    elsewhere: FakeReplica = await replicas("a2")
    config = make_config(("a", a.url, 2))
    p: Proxy = await proxy(config)
    moved = dataclasses.replace(config, replicas=(
        ReplicaConfig(name="a", url=elsewhere.url, max_concurrency=2),))
    reload_to(p, moved)
    result = await p.app[RELOADER].reload("test")
    assert result.result == REFUSED
    assert "replicas[0].url (of a; to move a replica, give it a new name)" in result.message
    assert p.scheduler.replicas[0].url == a.url


async def test_a_draining_replica_name_cannot_come_back_until_it_is_gone(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    config = make_config(("a", a.url, 1), ("b", b.url, 1))
    p: Proxy = await proxy(config)
    held = asyncio.create_task(post(client, p, {"hold": True}))
    await until(lambda: a.in_flight + b.in_flight == 1, "one request in flight")
    busy = "a" if a.in_flight else "b"
    other = b if busy == "a" else a
    reload_to(p, with_replicas(config, (other, 1)))
    assert (await p.app[RELOADER].reload("test")).ok

    reload_to(p, config)  # the busy one back while it still drains
    result = await p.app[RELOADER].reload("test")
    assert result.result == REFUSED
    assert f"({busy}) is still finishing its work" in result.message

    a.gate.set()
    b.gate.set()
    assert (await asyncio.wait_for(held, BOUND_S))[0] == 200
    await until(lambda: len(p.scheduler.replicas) == 1, f"{busy} gone")
    await until(lambda: pool_names(p) == {other.name}, f"{busy}'s pools closed")
    assert (await p.app[RELOADER].reload("test")).ok  # now it may come back
    assert {r.name for r in p.scheduler.replicas} == {"a", "b"}
    answers = await asyncio.wait_for(
        asyncio.gather(*(post(client, p, {}) for _ in range(4))), BOUND_S)
    assert {body["replica"] for _, body in answers} == {"a", "b"}


async def test_nothing_in_flight_or_queued_is_dropped_across_reloads(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    config = make_config(("a", a.url, 1))
    p: Proxy = await proxy(config)
    async with client.post(p.url + "/v1/completions",
                           json={"stream": True, "hold": True, "events": 3}) as stream:
        assert stream.status == 200
        first = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), BOUND_S)
        queued = [asyncio.create_task(post(client, p, {"hold": True, "i": i}))
                  for i in range(3)]
        await until(lambda: p.scheduler.queue_depth == 3, "three requests queued")
        # Reloads that change nothing, then the queue's bounds below what waits, then b
        # in and a out: each applies, and none drops a request.
        smaller = dataclasses.replace(config, queue=QueueConfig(max_size=1, timeout_s=30))
        for step in (config, smaller, with_replicas(smaller, (b, 1))):
            reload_to(p, step)
            assert (await p.app[RELOADER].reload("test")).ok
        await until(lambda: b.in_flight == 1, "b took the head of the queue")
        assert p.scheduler.queue_depth == 2  # still waiting, above max_size=1: not dropped
        # A new arrival meets the lowered bound.
        status, body = await post(client, p, {})
        assert (status, body["error"]["code"]) == (429, "queue_full")
        a.gate.set()
        b.gate.set()
        rest = await asyncio.wait_for(stream.content.read(), BOUND_S)
    assert first.startswith(b"data: ") and rest.endswith(b"data: [DONE]\n\n")
    answers = await asyncio.wait_for(asyncio.gather(*queued), BOUND_S)
    assert [(s, body["replica"]) for s, body in answers] == [(200, "b")] * 3
    assert a.aborted == 0 and b.aborted == 0
    assert p.metric("batchgate_config_reloads_total", result="success") == 3.0


async def test_logging_reload_turns_the_access_log_on_and_changes_its_format(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    config = make_config(("a", a.url, 1))
    quiet = dataclasses.replace(config, logging=dataclasses.replace(
        config.logging, level="warning"))
    out = io.BytesIO()
    access_log = AccessLog(out, "json")
    try:
        from proxy.server import _reconfigure_access_log

        apply = _reconfigure_access_log(access_log)
        apply(quiet)
        p: Proxy = await proxy(quiet, access_log=access_log)
        p.app[RELOADER].on_reload(apply)
        assert (await post(client, p, {}))[0] == 200
        reload_to(p, dataclasses.replace(config, logging=dataclasses.replace(
            config.logging, level="info", format="text")))
        assert (await p.app[RELOADER].reload("test")).ok
        assert (await post(client, p, {}))[0] == 200
    finally:
        access_log.close()
    lines = out.getvalue().decode().splitlines()
    assert len(lines) == 1, lines  # the request before the reload was not logged
    assert lines[0].split()[1:4] == ["POST", "/v1/completions", "200"]  # text, not JSON


async def test_reload_without_a_file_is_refused(proxy: Factory, replicas: Factory) -> None:
    a: FakeReplica = await replicas("a")
    p: Proxy = await proxy(make_config(("a", a.url, 1)))
    result = await p.app[RELOADER].reload("test")
    assert result.result == INVALID and "no config file" in result.message


async def test_a_component_that_fails_to_apply_is_reported(
    proxy: Factory, replicas: Factory
) -> None:
    a: FakeReplica = await replicas("a")
    config = make_config(("a", a.url, 1))
    p: Proxy = await proxy(config)

    def broken(_config: Config) -> None:
        raise RuntimeError("key ring exploded")

    p.app[RELOADER].on_reload(broken)
    reload_to(p, config)
    result = await p.app[RELOADER].reload("test")
    assert result.result == FAILED
    assert result.message == "reload applied except: RuntimeError: key ring exploded"
    assert p.metric("batchgate_config_reloads_total", result="failure") == 1.0


def test_effective_config_round_trips_without_an_admin_section(tmp_path: Path) -> None:
    config = make_config(("a", "http://127.0.0.1:9000", 1))
    assert "admin" not in config_to_dict(config)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert load_config(path) == config


async def test_without_an_admin_listener_its_endpoints_are_on_the_public_port(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    config = make_config(("a", a.url, 1))
    p: Proxy = await proxy(config)
    reload_to(p, with_replicas(config, (a, 1), (b, 1)))
    async with client.post(p.url + "/admin/reload") as r:
        assert r.status == 200
        assert await r.json() == {"result": "success", "changes": "+b"}
    async with client.get(p.url + "/admin/reload") as r:
        assert r.status == 405
        assert (await r.json())["error"]["code"] == "method_not_allowed"
    async with client.get(p.url + "/admin/replicas") as r:
        assert [(e["name"], e["state"]) for e in await r.json()] == [
            ("a", "healthy"), ("b", "healthy")]
    async with client.get(p.url + "/metrics") as r:
        assert r.status == 200
        assert "batchgate_config_reloads_total" in await r.text()
    assert a.arrivals == b.arrivals == 0  # none of these reached a replica


async def test_health_reload_probes_every_replica_with_the_new_settings_at_once(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    config = make_config(("a", a.url, 1), health_interval_s=60.0)
    p: Proxy = await proxy(config)
    await until(lambda: a.health_hits == 1, "the startup probe")
    a.health_status = 500  # the next probe fails; with a 60 s interval, not for a while
    # unhealthy_after: 1, so the one probe the reload starts at once decides (default 3).
    reload_to(p, dataclasses.replace(config, health=dataclasses.replace(
        config.health, timeout_s=1.0, unhealthy_after=1)))
    result = await p.app[RELOADER].reload("test")
    assert (result.result, result.message) == (SUCCESS, "changed: health")
    await until(lambda: a.health_hits == 2, "a probe at once, with the new settings")
    await until(lambda: not p.scheduler.replicas[0].healthy, "a marked unhealthy")
    async with client.get(p.url + "/admin/replicas") as r:
        assert [(e["name"], e["state"]) for e in await r.json()] == [("a", "unhealthy")]


async def test_a_removed_replica_also_finishes_its_slot_free_requests_before_it_goes(
    proxy: Factory, replicas: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    config = make_config(("a", a.url, 1))
    p: Proxy = await proxy(config)

    async def light() -> int:  # a GET takes no slot (proxy.edge.light)
        async with client.get(p.url + "/v1/held", json={"hold": True}) as r:
            await r.read()
            return r.status

    held = asyncio.create_task(light())
    await until(lambda: a.in_flight == 1, "a GET in flight on a")
    assert p.scheduler.in_flight == 0  # no slot held: the scheduler retires a at once
    reload_to(p, with_replicas(config, (b, 1)))
    assert (await p.app[RELOADER].reload("test")).ok
    assert [r.name for r in p.scheduler.replicas] == ["b"]

    a.gate.set()
    assert await asyncio.wait_for(held, BOUND_S) == 200
    await until(lambda: pool_names(p) == {"b"}, "a's pools closed after its last exchange")
    samples = [s for family in p.app[METRICS].registry.collect() for s in family.samples]
    assert [s for s in samples if s.labels.get("replica") == "a"] == []


async def test_a_component_that_refuses_the_new_config_stops_the_reload_before_it_applies(
    proxy: Factory, replicas: Factory
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    config = make_config(("a", a.url, 1))
    p: Proxy = await proxy(config)
    seen: list[Config] = []

    def keys_file_gone(_config: Config) -> None:  # e.g. the key ring re-reading its file
        raise ConfigError("keys.txt: auth.api_keys_file: cannot read keys file")

    p.app[RELOADER].on_reload(keys_file_gone)
    p.app[RELOADER].on_reload(seen.append)
    reload_to(p, with_replicas(config, (a, 1), (b, 1)))
    result = await p.app[RELOADER].reload("test")
    assert (result.result, result.message) == (
        INVALID, "keys.txt: auth.api_keys_file: cannot read keys file")
    assert [r.name for r in p.scheduler.replicas] == ["a"] and seen == []
    assert p.metric("batchgate_config_reloads_total", result="failure") == 1.0
