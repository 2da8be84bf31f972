"""The upstream HTTP/1.1 client against real servers on 127.0.0.1.

An aiohttp app (``handler_cancellation=True``, as replicas behind the proxy behave) for the
well-behaved cases; raw asyncio servers for replicas that close, stall or go silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
import uvloop
from aiohttp import web

from proxy.core.errors import UpstreamError, UpstreamTimeout
from proxy.upstream.connection import _HIGH_WATER, Response
from proxy.upstream.pool import ConnectionPool
from tests.integration.conftest import BOUND_S, Proxy, make_config, start_app, until

BIG = 8 * 1024 * 1024


@dataclass
class Replica:
    """Counts the TCP connections it saw and the handlers that were cancelled."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    peers: set[object] = field(default_factory=set)
    aborted: int = 0
    held: int = 0
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2 * BIG)
        app.router.add_post("/echo", self.echo)
        app.router.add_get("/sse", self.sse)
        app.router.add_get("/big", self.big)
        app.router.add_get("/hold", self.hold)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        self.peers.add(request.transport and request.transport.get_extra_info("peername"))
        raw = await request.read()
        return web.json_response({"len": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                                  "path": request.path_qs, "x": request.headers.get("X-A")})

    async def sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await response.write(b"data: 1\n\n")
            await self.gate.wait()  # the test reads event 1 before event 2 exists
            await response.write(b"data: 2\n\n")
            await response.write_eof()
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        return response

    async def hold(self, _request: web.Request) -> web.Response:
        self.held += 1
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        return web.Response(text="late")

    async def big(self, _request: web.Request) -> web.Response:
        return web.Response(body=bytes(range(256)) * (BIG // 256))


async def _replica() -> AsyncIterator[Replica]:
    r = Replica()
    runner, r.url = await start_app(r.app())
    yield r
    r.gate.set()
    await runner.cleanup()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start a raw asyncio server running ``handler`` per connection; returns its URL."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(handler: Handler) -> str:
        async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


async def _pools() -> AsyncIterator[Callable[..., ConnectionPool]]:
    """Pool factory; asserts nothing is left checked out after the test, then closes all."""
    made: list[ConnectionPool] = []

    def make(url: str, *, limit: int = 4, read_timeout_s: float = 5.0) -> ConnectionPool:
        pool = ConnectionPool(url, limit=limit, connect_timeout_s=2.0,
                              read_timeout_s=read_timeout_s)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        assert pool.active == 0, repr(pool)
        await pool.close()
    await asyncio.sleep(0.01)  # let closed transports run connection_lost


# The fixtures are plain async generators too, so test_on_uvloop can run every test on uvloop.
replica = pytest.fixture(name="replica")(_replica)
raw_server = pytest.fixture(name="raw_server")(_raw_server)
pools = pytest.fixture(name="pools")(_pools)
FIXTURES = {"replica": _replica, "raw_server": _raw_server, "pools": _pools}


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


async def read_all(response: Response) -> bytes:
    chunks = []
    while chunk := await response.readany():
        chunks.append(chunk)
    return b"".join(chunks)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_keep_alive_reuses_one_connection(
    replica: Replica, pools: Callable[..., ConnectionPool]
) -> None:
    pool = pools(replica.url + "/")
    for i in range(2):
        response = await pool.request("POST", f"/echo?i={i}", [("X-A", "b")], b"hi")
        assert (pool.active, pool.idle) == (1, 0)  # the idle one was taken
        assert response.status == 200 and b'"path": "/echo?i=%d"' % i in await read_all(response)
        response.release()
        assert (pool.active, pool.idle) == (0, 1)
    assert len(replica.peers) == 1


async def test_8mib_body_round_trip(
    replica: Replica, pools: Callable[..., ConnectionPool]
) -> None:
    pool = pools(replica.url)
    body = hashlib.sha256(b"seed").digest() * (BIG // 32)
    response = await pool.request("POST", "/echo", [("Content-Type", "application/x")], body)
    answer = await read_all(response)
    response.release()
    assert hashlib.sha256(body).hexdigest().encode() in answer and b'"len": %d' % BIG in answer

    response = await pool.request("GET", "/big", [], b"")
    data = await read_all(response)
    response.release()
    assert data == bytes(range(256)) * (BIG // 256)
    assert pool.idle == 1


async def test_sse_events_arrive_one_by_one(
    replica: Replica, pools: Callable[..., ConnectionPool]
) -> None:
    pool = pools(replica.url)
    response = await pool.request("GET", "/sse", [], b"")
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert await response.readany() == b"data: 1\n\n"  # the server is blocked on the gate
    replica.gate.set()
    assert await read_all(response) == b"data: 2\n\n"
    assert response.complete
    response.release()
    assert pool.idle == 1  # pooled, held back before its first reuse (see pool._take_idle)


async def test_close_mid_stream_cancels_the_server_handler(
    replica: Replica, pools: Callable[..., ConnectionPool]
) -> None:
    pool = pools(replica.url)
    response = await pool.request("GET", "/sse", [], b"")
    assert await response.readany() == b"data: 1\n\n"
    response.close()
    response.close()  # idempotent
    await until(lambda: replica.aborted == 1, "replica handler cancelled")
    assert (pool.active, pool.idle) == (0, 0)


async def test_cancelled_readany_closes_the_connection(
    replica: Replica, pools: Callable[..., ConnectionPool]
) -> None:
    pool = pools(replica.url)
    response = await pool.request("GET", "/sse", [], b"")
    assert await response.readany() == b"data: 1\n\n"
    task = asyncio.ensure_future(response.readany())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (pool.active, pool.idle) == (0, 0)
    await until(lambda: replica.aborted == 1, "replica handler cancelled")
    response.release()  # the caller's finally: harmless now
    assert pool.idle == 0


async def test_pooled_connection_read_then_dropped_may_have_been_delivered(
    raw_server: Callable[[Handler], Awaitable[str]], pools: Callable[..., ConnectionPool]
) -> None:
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await read_request(reader)  # the second request arrives; close without answering

    pool = pools(await raw_server(answer_once))
    response = await pool.request("POST", "/", [], b"1")
    assert await read_all(response) == b"ok"
    response.release()
    with pytest.raises(UpstreamError) as info:
        await pool.request("POST", "/", [], b"2")
    assert (info.value.kind, info.value.unsent) == ("reset", False)
    assert (pool.active, pool.idle) == (0, 0)


async def test_close_seen_before_the_write_is_never_a_failure_and_stops_pooling(
    raw_server: Callable[[Handler], Awaitable[str]], pools: Callable[..., ConnectionPool]
) -> None:
    """llama.cpp closes right after a keep-alive response. A pooled connection whose close is
    in the kernel but not yet seen by the loop is found closed by a peek before the write:
    the request goes out on a new connection, and the pool stops pooling for this replica."""
    closed = asyncio.Event()
    connections = 0

    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        closed.set()

    pool = pools(await raw_server(answer_then_close))
    response = await pool.request("POST", "/", [], b"1")
    conn = response._conn
    assert await read_all(response) == b"ok"
    response.release()
    assert pool.idle == 1 and conn.transport is not None
    conn.transport.pause_reading()  # the loop has not seen the close yet
    await asyncio.wait_for(closed.wait(), BOUND_S)
    for body in (b"2", b"3"):
        response = await pool.request("POST", "/", [], body)
        assert await read_all(response) == b"ok"
        response.release()
    assert connections == 3
    assert not pool.pooling and pool.idle == 0
    assert "pooling=off" in repr(pool)


async def test_fresh_connection_closed_without_answer_may_have_been_delivered(
    raw_server: Callable[[Handler], Awaitable[str]], pools: Callable[..., ConnectionPool]
) -> None:
    async def never_answer(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    pool = pools(await raw_server(never_answer))
    with pytest.raises(UpstreamError):
        await pool.request("POST", "/", [], b"x")
    assert (pool.active, pool.idle) == (0, 0)


async def test_idle_connection_closed_by_server_is_dropped(
    raw_server: Callable[[Handler], Awaitable[str]], pools: Callable[..., ConnectionPool]
) -> None:
    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()

    pool = pools(await raw_server(answer_then_close))
    response = await pool.request("GET", "/", [], b"")
    assert await read_all(response) == b"ok"
    response.release()
    await until(lambda: pool.idle == 0, "idle connection dropped after the server closed it")
    response = await pool.request("GET", "/", [], b"")  # a new connection, not the dead one
    assert await read_all(response) == b"ok"
    response.release()


async def test_connect_refused(pools: Callable[..., ConnectionPool]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = pools(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamError) as info:
        await pool.request("GET", "/", [], b"")
    assert (info.value.kind, info.value.unsent) == ("connect", True)
    assert pool.active == 0


async def test_read_timeout_before_headers(
    raw_server: Callable[[Handler], Awaitable[str]], pools: Callable[..., ConnectionPool]
) -> None:
    async def hold(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # until the client gives up

    pool = pools(await raw_server(hold), read_timeout_s=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout):
        await pool.request("GET", "/", [], b"")
    assert 0.15 <= loop.time() - started < 2.0
    assert (pool.active, pool.idle) == (0, 0)


async def test_read_timeout_mid_body_and_trickle_does_not_time_out(
    raw_server: Callable[[Handler], Awaitable[str]], pools: Callable[..., ConnectionPool]
) -> None:
    async def trickle_then_hold(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(6):  # a byte every 0.1 s for 0.6 s: never 0.2 s of silence
            writer.write(b"x")
            await asyncio.sleep(0.1)
        await reader.read()

    pool = pools(await raw_server(trickle_then_hold), read_timeout_s=0.2)
    response = await pool.request("GET", "/", [], b"")
    got = b""
    with pytest.raises(UpstreamTimeout):
        while True:
            got += await asyncio.wait_for(response.readany(), BOUND_S)
    assert got == b"x" * 6
    response.close()


async def test_flow_control_with_a_slow_reader(
    replica: Replica, pools: Callable[..., ConnectionPool]
) -> None:
    pool = pools(replica.url, read_timeout_s=0.2)
    response = await pool.request("GET", "/big", [], b"")
    conn = response._conn
    digest = hashlib.sha256()
    largest = 0
    paused_seen = False
    await asyncio.sleep(0.5)  # paused for longer than read_timeout_s: our silence, not theirs
    while chunk := await response.readany():
        largest = max(largest, len(chunk))
        digest.update(chunk)
        await asyncio.sleep(0.001)
        paused_seen = paused_seen or conn.paused
    assert digest.digest() == hashlib.sha256(bytes(range(256)) * (BIG // 256)).digest()
    assert largest < _HIGH_WATER + 1024 * 1024  # never the whole 8 MiB in memory
    assert paused_seen or largest > _HIGH_WATER
    response.release()
    assert pool.idle == 1


async def test_cancel_while_waiting_for_headers_closes_the_connection(
    replica: Replica, pools: Callable[..., ConnectionPool]
) -> None:
    pool = pools(replica.url)
    task = asyncio.ensure_future(pool.request("GET", "/hold", [], b""))
    await until(lambda: replica.held == 1, "request at the replica")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (pool.active, pool.idle) == (0, 0)
    await until(lambda: replica.aborted == 1, "replica handler cancelled")


async def test_limit_is_enforced_and_idle_connections_make_room(
    replica: Replica, pools: Callable[..., ConnectionPool]
) -> None:
    pool = pools(replica.url, limit=1)
    response = await pool.request("POST", "/echo", [], b"")
    with pytest.raises(RuntimeError, match="limit=1"):
        await pool.request("POST", "/echo", [], b"", fresh=True)
    await read_all(response)
    response.release()
    assert pool.idle == 1
    response = await pool.request("POST", "/echo", [], b"", fresh=True)  # evicts the idle one
    assert pool.idle == 0
    await read_all(response)
    response.release()
    assert (pool.active, pool.idle) == (0, 0)


CASES = [f for name, f in sorted(globals().items()) if name.startswith("test_")]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__.removeprefix("test_"))
def test_on_uvloop(case: Callable[..., Awaitable[None]]) -> None:
    """Every test above again on uvloop: production runs it, and its transports differ."""

    async def run() -> None:
        async with contextlib.AsyncExitStack() as stack:
            kwargs = {
                name: await stack.enter_async_context(contextlib.asynccontextmanager(make)())
                for name, make in FIXTURES.items()
                if name in inspect.signature(case).parameters
            }
            await case(**kwargs)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


async def test_paused_reader_does_not_spin_the_read_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A caller reading slower than the replica sends pauses the socket; the read timer must
    then look again one period later, not fire on every loop pass."""
    from proxy.upstream.timer import ReadTimer

    calls = 0
    original = ReadTimer._fire

    def counting(self: ReadTimer) -> None:
        nonlocal calls
        calls += 1
        original(self)

    monkeypatch.setattr(ReadTimer, "_fire", counting)
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b"x" * (4 << 20)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await release.wait()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = ConnectionPool(f"http://127.0.0.1:{port}", limit=2, connect_timeout_s=1,
                             read_timeout_s=0.1)
    try:
        resp = await pool.request("GET", "/", [], b"")
        await resp.readany()
        await until(lambda: resp._conn.paused, "the reader paused the socket")
        calls = 0
        await asyncio.sleep(0.5)  # five read-timeout periods with the reader stalled
        assert calls <= 10, f"{calls} timer callbacks in 0.5 s"
        resp.close()
    finally:
        release.set()
        await pool.close()
        server.close()
        await server.wait_closed()


# -- odd responses through the running proxy (issue 7 A8) --------------------------------------

CHUNK_LINE = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;" + b"e" * (9 * 1024)
ODD = {
    "nul_in_header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "control_byte_in_header": b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",
    "head_70k_one_write": (b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * (70 * 1024)
                           + b"\r\nContent-Length: 2\r\n\r\nok"),
    "chunk_line_9k": CHUNK_LINE + b"\r\nok\r\n0\r\n\r\n",
    "gzip_chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                     b"2\r\nok\r\n0\r\n\r\n"),
    "status_below_100": b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok",
}


def odd_replica(raw: bytes) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        # Health probes get a plain 200: only the request under test meets the odd bytes.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                     if request.startswith(b"GET /health") else raw)
        await writer.drain()
        await reader.read()  # until the proxy hangs up

    return handle


@pytest.mark.parametrize("case", sorted(ODD))
async def test_malformed_response_is_a_clean_502_through_the_proxy(
    case: str, proxy: Callable[..., Awaitable[Proxy]], client: aiohttp.ClientSession,
    raw_server: Callable[[Handler], Awaitable[str]],
) -> None:
    url = await raw_server(odd_replica(ODD[case]))
    p = await proxy(make_config(("odd", url, 1), health_interval_s=60))
    async with client.post(p.url + "/v1/completions", json={"n": 1}) as resp:
        assert resp.status == 502, case
        body = await resp.json()
    assert body["error"]["type"] == "upstream_error"
    assert body["error"]["code"] == "upstream_malformed"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert p.metric("batchgate_upstream_errors_total", replica="odd", kind="malformed") == 1
    assert p.metric("batchgate_requests_total", replica="odd", route="/v1/completions",
                    code="200", tenant="none") == 0


async def test_header_bytes_above_0x7f_are_relayed(
    proxy: Callable[..., Awaitable[Proxy]], raw_server: Callable[[Handler], Awaitable[str]]
) -> None:
    raw = (b"HTTP/1.1 200 OK\r\nX-Utf: caf\xc3\xa9\r\nX-Raw: \x80\xff\r\n"
           b"Content-Length: 2\r\n\r\nok")
    url = await raw_server(odd_replica(raw))
    p = await proxy(make_config(("odd", url, 1), health_interval_s=60))
    host, port = p.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /v1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), BOUND_S)
    finally:
        writer.close()
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    # Valid UTF-8 is relayed byte for byte; other bytes as their Latin-1 characters
    # (aiohttp writes header values as UTF-8): never dropped.
    assert b"\r\nX-Utf: caf\xc3\xa9\r\n" in response
    assert b"\r\nX-Raw: \xc2\x80\xc3\xbf\r\n" in response


async def test_early_answer_during_a_large_upload_does_not_hang(
    raw_server: Callable[[Handler], Awaitable[str]], pools: Callable[..., ConnectionPool]
) -> None:
    """The replica answers 413 and stops reading an 8 MiB body: the request waits for the
    first of "response head arrived" and "upload done" (issue 7 A9; it hung on main)."""
    stop = asyncio.Event()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: the body is never read
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        await stop.wait()

    pool = pools(await raw_server(refuse), read_timeout_s=30.0)
    try:
        response = await asyncio.wait_for(pool.request("POST", "/", [], b"x" * BIG), BOUND_S)
        assert response.status == 413
        assert await read_all(response) == b"big"
        response.release()  # the rest of the upload is still queued: never reused
        assert (pool.active, pool.idle) == (0, 0)
    finally:
        stop.set()
