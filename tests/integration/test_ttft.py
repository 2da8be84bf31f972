"""TTFT means TTFT: time to first byte is labelled by whether the answer was an event stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp

from tests.integration.conftest import FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]
CHAT = "/v1/chat/completions"


async def test_time_to_first_byte_is_labelled_stream_true_or_false(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 2)))
    for spec in ({"stream": True}, {"stream": True}, {}):
        async with client.post(p.url + CHAT, json=spec) as resp:
            assert resp.status == 200
            await resp.read()
    await until(lambda: p.scheduler.idle(), "all done")
    name = "batchgate_time_to_first_byte_seconds_count"
    assert p.metric(name, route=CHAT, stream="true") == 2
    assert p.metric(name, route=CHAT, stream="false") == 1
