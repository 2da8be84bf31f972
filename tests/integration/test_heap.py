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
from tests.integration.conftest import BOUND_S, FakeReplica, make_config


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
