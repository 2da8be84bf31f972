"""What startup built is frozen out of the cyclic garbage collector while the proxy serves.

A full collection walks every tracked object; after startup that is some 50,000 (modules,
config, the metric registry), a pause of about 9 ms on the bench machine, long enough to
break P3's added inter-event p99 of 5 ms whenever it falls in a busy second. Frozen, they are
skipped (they are still freed by reference counting); the freeze ends when serving does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.config import LoggingConfig
from proxy.server import serve
from tests.integration.conftest import BOUND_S, FakeReplica, make_config, until


async def test_startup_objects_are_frozen_while_serving_and_thawed_after(
    replicas: Callable[..., Any],
) -> None:
    replica: FakeReplica = await replicas("r")
    config = make_config(("r", replica.url, 4), drain_timeout_s=0)
    config = dataclasses.replace(config, logging=LoggingConfig(level="warning"))
    gc.unfreeze()  # whatever an earlier test left: this one sees its own freeze
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(config, stop=stop, on_ready=lambda _h, port: ready.set_result(port)))
    port = await asyncio.wait_for(ready, BOUND_S)
    try:
        # The app and its state were built before the freeze: a full collection skips them.
        assert gc.get_freeze_count() > 1000
        async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi"}) as resp:
            assert resp.status == 200
    finally:
        stop.set()
        await asyncio.wait_for(task, BOUND_S)
    assert gc.get_freeze_count() == 0  # back in the collector's care once serving ends


async def test_a_closed_caller_connection_is_freed_by_reference_counting(
    replicas: Callable[..., Any],
) -> None:
    """Its protocol held the request's body stream, which holds the protocol: a cycle per
    connection that only the cycle collector could free (9 objects each; with 500 streams
    a gen-2 collection of them took 45 ms, nine times P3's inter-event budget)."""
    from proxy.edge.protocol import LimitedHandler

    def handlers() -> int:
        return sum(type(o) is LimitedHandler for o in gc.get_objects())

    replica: FakeReplica = await replicas("r")
    config = make_config(("r", replica.url, 4), drain_timeout_s=0)
    config = dataclasses.replace(config, logging=LoggingConfig(level="warning"))
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(config, stop=stop, on_ready=lambda _h, port: ready.set_result(port)))
    port = await asyncio.wait_for(ready, BOUND_S)
    gc.collect()
    gc.disable()  # what is left now is left until the cycle collector runs
    try:
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                   b"application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(), BOUND_S)  # to the proxy's close
            assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
            writer.close()
            await writer.wait_closed()
        await until(lambda: handlers() == 0, "every closed connection's handler freed")
    finally:
        gc.enable()
        stop.set()
        await asyncio.wait_for(task, BOUND_S)
