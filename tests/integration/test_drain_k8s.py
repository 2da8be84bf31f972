"""A drain that fits Kubernetes, in process: the quiet period, Connection: close on every
answer (and the connection really closed, seen on the socket), 503 after the quiet period, the
deadline counted from the drain's start, and ``GET /wait-for-drain``.

The drain's clock and sleep are the injected fake (``FakeTime``): the quiet period and the
deadline pass when the test advances them, never by waiting. Each advance is made once the
drain is asleep on the fake clock (``asleep``), so it is never early.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from proxy.config import ApiKey, AuthConfig, ConfigError, parse_config
from proxy.control.drain import Lifecycle
from proxy.control.reload import plan
from proxy.edge.keys import LIFECYCLE
from tests.integration.conftest import BOUND_S, FakeReplica, FakeTime, Proxy, make_config, until
from tests.integration.raw import Answer, Caller

Factory = Callable[..., Any]
COMPLETIONS = "/v1/completions"
JSON = ("Content-Type", "application/json")


def lifecycle(p: Proxy) -> Lifecycle:
    return p.app[LIFECYCLE]


async def asleep(time: FakeTime, delay: float, what: str) -> None:
    """Until something (the drain) sleeps ``delay`` on the fake clock: an advance is not early."""
    await until(lambda: delay in time.sleeps, f"the drain to sleep {delay}s ({what})")
    time.sleeps.remove(delay)


@contextlib.asynccontextmanager
async def caller(url: str) -> AsyncIterator[Caller]:
    c = await Caller.open(url)
    try:
        yield c
    finally:
        c.close()


async def post(c: Caller, payload: dict[str, Any] | None = None) -> Answer:
    return await c.request("POST", COMPLETIONS, json.dumps(payload or {}).encode(), JSON)


def wait_for_drain(client: aiohttp.ClientSession, url: str) -> asyncio.Task[tuple[int, Any]]:
    async def call() -> tuple[int, Any]:
        async with client.get(url + "/wait-for-drain") as r:
            return r.status, await r.json()

    return asyncio.create_task(call())


async def held(client: aiohttp.ClientSession, url: str, **spec: Any) -> asyncio.Task[Any]:
    async def call() -> tuple[int, dict[str, str], bytes]:
        async with client.post(url + COMPLETIONS, json={"hold": True, **spec}) as r:
            return r.status, dict(r.headers), await r.read()

    return asyncio.create_task(call())


async def drain_setup(
    replicas: Factory, proxy: Factory, cap: int, **config: Any
) -> tuple[FakeReplica, FakeTime, Proxy]:
    """One replica ``r`` with ``cap`` slots behind a proxy whose drain runs on a fake clock."""
    r: FakeReplica = await replicas("r")
    time = FakeTime()
    p: Proxy = await proxy(make_config(("r", r.url, cap), **config), timing=time.timing())
    return r, time, p


async def test_the_quiet_period_serves_keep_alive_callers_then_closes_their_connections(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r, time, p = await drain_setup(replicas, proxy, 1, drain_quiet_s=5)
    async with caller(p.url) as kept, caller(p.url) as idle:
        before = await post(kept)
        assert before.status == 200 and before.header("Connection") is None  # keep-alive
        assert (await idle.request("GET", "/healthz")).status == 200  # open, idle at the drain

        waiting = wait_for_drain(client, p.url)
        await until(lambda: lifecycle(p).draining, "the drain to begin")
        async with client.get(p.url + "/readyz") as ready:
            assert ready.status == 503  # at once, before the quiet period is over
            assert ready.headers["Connection"] == "close"

        # Served, on the connection that was open before the drain, and then closed.
        during = await post(kept)
        assert during.status == 200, during.body
        assert json.loads(during.body)["replica"] == "r"
        assert during.header("Connection") == "close"
        assert await kept.at_eof()
        # The same on the connection that was idle, and on a new one.
        assert (await post(idle)).header("Connection") == "close"
        assert await idle.at_eof()
        async with caller(p.url) as fresh:
            answer = await post(fresh)
            assert (answer.status, answer.header("Connection")) == (200, "close")
            assert await fresh.at_eof()
        # Slot-free answers too: one built whole by batchgate, one relayed.
        for target in ("/v1/models", "/version"):
            async with caller(p.url) as light:
                answer = await light.request("GET", target)
                assert (answer.status, answer.header("Connection")) == (200, "close"), target
                assert await light.at_eof()
        assert r.arrivals == 5  # /v1/models is answered by the replica's own route
        assert not waiting.done()  # the quiet period is not over: the drain is not done

        await asleep(time, 5.0, "the quiet period")
        time.advance(5.0)
        assert await asyncio.wait_for(waiting, BOUND_S) == (200, {"drained": True, "cut": 0})
    assert p.metric("batchgate_rejected_requests_total", reason="draining") == 0


async def test_after_the_quiet_period_503_draining_closes_the_connection_and_says_rejected(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r, time, p = await drain_setup(replicas, proxy, 1, drain_quiet_s=5)
    async with caller(p.url) as kept:
        assert (await post(kept)).status == 200
        waiting = wait_for_drain(client, p.url)
        await until(lambda: lifecycle(p).draining, "the drain to begin")
        await asleep(time, 5.0, "the quiet period")
        time.advance(5.0)
        await until(lambda: lifecycle(p).refusing, "the quiet period to end")

        refused = await post(kept)
        assert refused.status == 503
        assert refused.header("Connection") == "close"
        assert refused.header("X-Batchgate-Rejected") == "draining"
        assert refused.header("Retry-After") == "1"
        assert json.loads(refused.body)["error"]["code"] == "draining"
        assert await kept.at_eof()
    assert r.arrivals == 1
    assert await asyncio.wait_for(waiting, BOUND_S) == (200, {"drained": True, "cut": 0})
    assert p.metric("batchgate_rejected_requests_total", reason="draining") == 1


async def test_a_stream_started_in_the_quiet_period_says_close_and_runs_to_its_end(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r, time, p = await drain_setup(replicas, proxy, 2, drain_quiet_s=5)
    async with caller(p.url) as before, caller(p.url) as after:
        body = json.dumps({"stream": True, "hold": True, "events": 3}).encode()
        before.send(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}"
                    "\r\n\r\n".encode() + body)
        await until(lambda: r.in_flight == 1, "the first stream to start")
        lifecycle(p).start_drain(5, 30, "test")
        # A stream that starts after the drain began carries Connection: close in its head.
        after.send(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}"
                   "\r\n\r\n".encode() + body)
        await until(lambda: r.in_flight == 2, "the second stream to start")
        r.gate.set()
        first, second = await asyncio.wait_for(
            asyncio.gather(before.answer(), after.answer()), BOUND_S)
        # Both end properly; the first one's head had gone out before the drain.
        for answer in (first, second):
            assert (answer.status, answer.complete) == (200, True)
            assert answer.body.endswith(b"data: [DONE]\n\n")
        assert first.header("Connection") is None
        assert second.header("Connection") == "close"
        assert await after.at_eof()
        # The first connection stays open: its next request is answered, with close.
        assert (await post(before)).header("Connection") == "close"
        assert await before.at_eof()
    await asleep(time, 5.0, "the quiet period")
    time.advance(5.0)
    await asyncio.wait_for(lifecycle(p).settled.wait(), BOUND_S)
    assert (r.completed, r.aborted) == (3, 0)


async def test_the_deadline_counts_from_the_drains_start_not_from_the_quiet_periods_end(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r, time, p = await drain_setup(replicas, proxy, 1, drain_quiet_s=2, drain_timeout_s=3)
    in_flight = await held(client, p.url)
    await until(lambda: r.in_flight == 1, "a request in flight")
    queued = await held(client, p.url)
    await until(lambda: p.scheduler.queue_depth == 1, "a request queued behind it")
    waiting = wait_for_drain(client, p.url)
    await until(lambda: lifecycle(p).draining, "the drain to begin")
    await asleep(time, 2.0, "the quiet period")
    time.advance(2.0)
    # One second of the deadline is left (3 s from the start), not 3 after the quiet period.
    await asleep(time, 1.0, "the rest of the deadline")
    assert not in_flight.done() and not queued.done()
    time.advance(1.0)

    assert await asyncio.wait_for(waiting, BOUND_S) == (200, {"drained": False, "cut": 2})
    status, headers, body = await asyncio.wait_for(in_flight, BOUND_S)
    assert status == 503 and json.loads(body)["error"]["code"] == "draining"
    assert "X-Batchgate-Rejected" not in headers  # it reached the replica
    status, headers, body = await asyncio.wait_for(queued, BOUND_S)
    assert status == 503 and json.loads(body)["error"]["code"] == "draining"
    assert headers["X-Batchgate-Rejected"] == "draining"  # it never left the queue
    await until(lambda: r.aborted == 1, "the replica to see its client leave")
    assert r.arrivals == 1


async def test_wait_for_drain_answers_once_in_flight_and_queued_work_is_done(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r, _time, p = await drain_setup(replicas, proxy, 1, drain_quiet_s=0)
    in_flight = await held(client, p.url)
    await until(lambda: r.in_flight == 1, "a request in flight")
    queued = await held(client, p.url)
    await until(lambda: p.scheduler.queue_depth == 1, "a request queued behind it")
    callers = [wait_for_drain(client, p.url) for _ in range(3)]
    await until(lambda: lifecycle(p).refusing, "the drain to begin")
    async with client.get(p.url + "/readyz") as ready:
        assert ready.status == 503
    assert not any(c.done() for c in callers)

    r.gate.set()
    for task in (in_flight, queued):
        assert (await asyncio.wait_for(task, BOUND_S))[0] == 200
    answers = await asyncio.wait_for(asyncio.gather(*callers), BOUND_S)
    assert answers == [(200, {"drained": True, "cut": 0})] * 3
    # After the drain: at once.
    assert await asyncio.wait_for(wait_for_drain(client, p.url), BOUND_S) == (
        200, {"drained": True, "cut": 0})
    assert all(path != "/wait-for-drain" for _, path, _ in r.seen)  # never proxied
    assert r.completed == 2


async def test_a_wait_for_drain_caller_that_hangs_up_stops_nothing(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r, _time, p = await drain_setup(replicas, proxy, 1, drain_quiet_s=0)
    in_flight = await held(client, p.url)
    await until(lambda: r.in_flight == 1, "a request in flight")
    async with caller(p.url) as hook:
        hook.send(b"GET /wait-for-drain HTTP/1.1\r\nHost: t\r\n\r\n")
        await until(lambda: lifecycle(p).draining, "the drain to begin")
    # The hook's connection is gone; the drain goes on, and its request is served.
    r.gate.set()
    assert (await asyncio.wait_for(in_flight, BOUND_S))[0] == 200
    await asyncio.wait_for(lifecycle(p).finished.wait(), BOUND_S)
    assert lifecycle(p).cut_count == 0 and lifecycle(p).refusing


async def test_wait_for_drain_on_an_idle_proxy_waits_for_the_quiet_period(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    """Idle at the call is not drained: the quiet period still takes (and serves) requests."""
    _r, time, p = await drain_setup(replicas, proxy, 1, drain_quiet_s=5)
    waiting = wait_for_drain(client, p.url)
    await asleep(time, 5.0, "the quiet period")
    async with client.post(p.url + COMPLETIONS, json={}) as served:
        assert served.status == 200
    assert not waiting.done()
    time.advance(5.0)
    assert await asyncio.wait_for(waiting, BOUND_S) == (200, {"drained": True, "cut": 0})


async def test_wait_for_drain_needs_no_api_key(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    config = dataclasses.replace(
        make_config(("r", r.url, 1), drain_quiet_s=0),
        auth=AuthConfig(api_keys=(ApiKey("team", "sk-0123456789"),)),
    )
    p: Proxy = await proxy(config)
    async with client.post(p.url + COMPLETIONS, json={}) as refused:
        assert refused.status == 401  # auth is on
    assert await asyncio.wait_for(wait_for_drain(client, p.url), BOUND_S) == (
        200, {"drained": True, "cut": 0})
    assert lifecycle(p).draining and r.arrivals == 0


async def test_sigterm_and_wait_for_drain_are_one_drain_timed_from_the_first(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r, time, p = await drain_setup(replicas, proxy, 1, drain_quiet_s=0, drain_timeout_s=4)
    in_flight = await held(client, p.url)
    await until(lambda: r.in_flight == 1, "a request in flight")
    assert lifecycle(p).start_drain(0, 4, "SIGTERM")
    await asleep(time, 4.0, "the deadline")
    time.advance(3.0)
    waiting = wait_for_drain(client, p.url)  # joins: its own 4 s would end at 7
    async with client.get(p.url + "/readyz") as ready:
        assert ready.status == 503
    assert not lifecycle(p).start_drain(0, 4, "again")
    time.advance(1.0)
    assert await asyncio.wait_for(waiting, BOUND_S) == (200, {"drained": False, "cut": 1})
    assert (await asyncio.wait_for(in_flight, BOUND_S))[0] == 503


def test_drain_quiet_s_defaults_to_5_and_must_be_a_number_at_least_0() -> None:
    replica = {"name": "r", "url": "http://127.0.0.1:1", "max_concurrency": 1}
    assert parse_config({"replicas": [replica]}).server.drain_quiet_s == 5.0
    assert parse_config({"replicas": [replica],
                         "server": {"drain_quiet_s": 0}}).server.drain_quiet_s == 0.0
    with pytest.raises(ConfigError) as err:
        parse_config({"replicas": [replica], "server": {"drain_quiet_s": -1}})
    assert str(err.value) == "config: server.drain_quiet_s: must be a number >= 0, got -1"


def test_drain_quiet_s_changes_live() -> None:
    old = make_config(("r", "http://127.0.0.1:1", 1))
    new = dataclasses.replace(old, server=dataclasses.replace(old.server, drain_quiet_s=15))
    changes = plan(old, new)
    assert not changes.refused, changes.refusal()
    assert changes.changed == {"server"}
