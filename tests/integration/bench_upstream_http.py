"""Micro-benchmark (not a test): client-side CPU per small request, this pool vs aiohttp.

    .venv/bin/python -m tests.integration.bench_upstream_http [requests]

The upstream is a raw asyncio Protocol on uvloop in a *separate process*, so the client's
``time.process_time()`` counts only the client: N sequential small POSTs on one keep-alive
connection, each response read to its end and released. A floor is measured too: a bare
Protocol that writes fixed bytes and waits for a fixed-size answer (the event loop's own cost).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection

import aiohttp
import uvloop

from proxy.upstream.pool import ConnectionPool

BODY = b'{"model":"m","prompt":"hello","max_tokens":8}'
ANSWER = b'{"id":"x","choices":[{"text":" hi"}]}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(ANSWER), ANSWER)
)
HEADERS = [("Content-Type", "application/json"), ("X-Request-Id", "0123456789abcdef"),
           ("X-Forwarded-For", "10.0.0.1"), ("Authorization", "Bearer sk-test")]


class _Upstream(asyncio.Protocol):
    """Answers every complete request (head + Content-Length body) with RESPONSE."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[: end + 4 + length]
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]


def _serve(port_out: Connection) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Upstream, "127.0.0.1", 0)
        port_out.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    uvloop.run(main())


async def bench_pool(url: str, n: int) -> None:
    pool = ConnectionPool(url, limit=1, connect_timeout_s=5, read_timeout_s=30)
    for _ in range(n):
        response = await pool.request("POST", "/v1/completions", HEADERS, BODY)
        while await response.readany():
            pass
        response.release()
    assert pool.idle == 1
    await pool.close()


async def bench_aiohttp(url: str, n: int) -> None:
    # Configured as relay.Upstreams configures its pooled sessions.
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=30)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     auto_decompress=False,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        target = url + "/v1/completions"
        skip = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
        for _ in range(n):
            response = await session.request("POST", target, data=BODY, headers=HEADERS,
                                             allow_redirects=False, skip_auto_headers=skip)
            while await response.content.readany():
                pass
            response.release()


async def bench_floor(url: str, n: int) -> None:
    host, port = url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
               % (len(BODY), BODY))

    class Floor(asyncio.Protocol):
        waiter: asyncio.Future[None]
        got = 0

        def data_received(self, data: bytes) -> None:
            self.got += len(data)
            if self.got >= len(RESPONSE):
                self.got = 0
                self.waiter.set_result(None)

    transport, proto = await loop.create_connection(Floor, host, int(port))
    for _ in range(n):
        proto.waiter = loop.create_future()
        transport.write(request)
        await proto.waiter
    transport.close()


async def measure(name: str, run: Callable[[str, int], Awaitable[None]], url: str,
                  n: int) -> None:
    await run(url, 500)  # warm up: imports, caches, first connection
    cpu, wall = time.process_time(), time.perf_counter()
    await run(url, n)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{name:<22} {cpu / n * 1e6:7.1f} µs CPU/request  {wall / n * 1e6:7.1f} µs wall/request")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_serve, args=(child,), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{parent.recv()}"
    print(f"{n} sequential small POSTs on one keep-alive connection, client on uvloop")

    async def run_all() -> None:
        for _ in range(2):
            await measure("floor (bare Protocol)", bench_floor, url, n)
            await measure("upstream_http pool", bench_pool, url, n)
            await measure("aiohttp ClientSession", bench_aiohttp, url, n)

    try:
        uvloop.run(run_all())
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    main()
