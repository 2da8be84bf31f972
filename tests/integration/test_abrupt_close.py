"""Callers that close the connection the moment the response is complete.

With ``handler_cancellation`` on, aiohttp cancels a handler whose connection is lost, even when
the response is already written. Clients such as ``requests`` read the body and close at once,
so any bookkeeping that sits behind an ``await`` after the last byte (slot release, metrics)
would be cancelled now and then. Here a bare socket does exactly that, many times over.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from proxy.edge.app import METRICS
from tests.integration.conftest import BOUND_S, FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]

ROUNDS = 20


async def request_then_close(url: str, payload: dict[str, Any]) -> tuple[int, bytes]:
    """Send one complete ``Connection: close`` request, read exactly the response, hang up."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        body = json.dumps(payload).encode()
        writer.write(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
        }
        if b"content-length" in headers:
            content = await reader.readexactly(int(headers[b"content-length"]))
        else:
            assert headers.get(b"transfer-encoding") == b"chunked", head
            content = b""
            while size := int((await reader.readline()).split(b";")[0], 16):
                content += (await reader.readexactly(size + 2))[:-2]
            assert await reader.readline() == b"\r\n"  # the end of the chunked body
        return status, content
    finally:
        # Like `requests`: the body is complete, so close now, without waiting for the
        # server to close its side.
        writer.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_caller_closing_right_after_the_response_loses_no_bookkeeping(
    replicas: Factory, proxy: Factory, stream: bool
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 2)))
    for i in range(ROUNDS):
        status, content = await asyncio.wait_for(
            request_then_close(p.url, {"stream": stream, "events": 2, "i": i}), BOUND_S
        )
        assert status == 200
        assert content.endswith(b"data: [DONE]\n\n" if stream else b"}")
    await until(lambda: r.completed == ROUNDS and r.in_flight == 0, "every request served")
    await until(lambda: p.scheduler.idle(), "every slot released")
    assert p.metric("batchgate_requests_total", replica="r", route="/v1/completions",
                    code="200", tenant="none") == ROUNDS
    assert r.aborted == 0
    # Each caller hung up only after its answer was complete: not a disconnect.
    assert disconnects(p) == 0


def disconnects(p: Proxy) -> float:
    return sum(
        sample.value
        for family in p.app[METRICS].registry.collect()
        if family.name == "batchgate_client_disconnects"
        for sample in family.samples
        if sample.name == "batchgate_client_disconnects_total"
    )
