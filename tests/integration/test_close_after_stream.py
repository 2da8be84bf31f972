"""llama.cpp's server closes the connection after every stream while advertising keep-alive.

Its close follows the last byte of the stream, so a request dispatched in that same instant
(a waiter takes the freed slot at once) can be written onto the closing connection before its
FIN arrives: no peek can see it, and a POST written there is lost. The replica here does
exactly that, deterministically: it answers the first request of each connection and closes,
without answering, when a second request arrives on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from proxy.edge.keys import UPSTREAMS
from proxy.upstream.pool import STREAM_PROBATION_S
from tests.integration.conftest import Proxy, make_config
from tests.integration.raw import Caller, Request, raw_replica, response

Factory = Callable[..., Any]
EVENTS = b'data: {"choices":[{"index":0,"text":" t"}]}\n\ndata: [DONE]\n\n'
STREAM_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n"
                 + b"%x\r\n" % len(EVENTS) + EVENTS + b"\r\n0\r\n\r\n")
JSON_ANSWER = response(200, b'{"ok": true}', ("Content-Type", "application/json"))


def one_answer_per_connection() -> Any:
    served: set[int] = set()

    async def script(request: Request, w: asyncio.StreamWriter) -> bool:
        if id(w) in served:
            return False  # the close that crosses the next request on the wire
        served.add(id(w))
        if b"stream" in request.body:
            w.write(STREAM_ANSWER)
        else:
            w.write(JSON_ANSWER)
        return True

    return script


async def test_a_post_after_a_stream_never_lands_on_the_connection_the_stream_used(
    proxy: Factory,
) -> None:
    async with raw_replica(one_answer_per_connection()) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1), retries=0))
        caller = await Caller.open(p.url)
        try:
            stream = await caller.request("POST", "/v1/completions", b'{"stream": true}')
            after = await caller.request("POST", "/v1/completions", b'{"n": 2}')
        finally:
            caller.close()
    assert stream.status == 200 and stream.body == EVENTS
    assert after.status == 200, after  # not 502: it went out on a connection of its own
    assert p.metric("batchgate_upstream_errors_total", replica="r", kind="reset") == 0


async def test_a_replica_that_keeps_connections_after_streams_gets_them_reused(
    proxy: Factory,
) -> None:
    async def keep_alive(request: Request, w: asyncio.StreamWriter) -> bool:
        if b"stream" in request.body:
            w.write(STREAM_ANSWER)
        else:
            w.write(JSON_ANSWER)
        return True

    async with raw_replica(keep_alive) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1), retries=0))
        (pool, _light) = p.app[UPSTREAMS].pools()
        caller = await Caller.open(p.url)
        try:
            assert (await caller.request("POST", "/v1/completions", b'{"stream": 1}')).status == 200
            opened = r.connections
            # The hold-back is a span of time by design: let it pass (not a synchronisation).
            await asyncio.sleep(STREAM_PROBATION_S * 1.5)
            assert (await caller.request("POST", "/v1/completions", b'{"n": 2}')).status == 200
            assert pool.streams_keep_alive  # learnt: it survived the hold-back
            assert (await caller.request("POST", "/v1/completions", b'{"stream": 1}')).status == 200
            assert (await caller.request("POST", "/v1/completions", b'{"n": 4}')).status == 200
        finally:
            caller.close()
    assert r.connections == opened  # every request after the first on the same connection
