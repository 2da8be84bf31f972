"""The limits on callers, on real sockets, through ``proxy.server.serve`` (the listener that
production runs): slow heads and bodies, head size, connection count, Host, TRACE/CONNECT,
keep-alive and send timeouts. Every answer batchgate gives itself is OpenAI-style JSON.

Timeouts here are small (tenths of a second) so each test is quick; what is asserted is the
outcome (which answer, which metric), never how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import aiohttp.web_protocol
import pytest
from aiohttp.http_parser import HttpRequestParserPy
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config, LoggingConfig
from proxy.edge.protocol import LINGER_S
from proxy.server import serve
from tests.integration.conftest import BOUND_S, FakeReplica, make_config, until

Factory = Callable[..., Any]


@dataclasses.dataclass
class Served:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def metric(self, name: str, **labels: str) -> float:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/metrics") as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        raise AssertionError(f"no sample {name}{labels}")

    async def rejected(self, reason: str) -> float:
        return await self.metric("batchgate_rejected_requests_total", reason=reason)

    async def connect(self) -> Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return Conn(reader, writer)


@dataclasses.dataclass
class Conn:
    """A caller on a bare socket: what it sends and when is the test's to decide."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        """One answer with a Content-Length body (all of batchgate's own answers have one)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), BOUND_S)
        lines = head[:-4].decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        body = await asyncio.wait_for(
            self.reader.readexactly(int(headers.get("content-length", "0"))), BOUND_S)
        return int(lines[0].split()[1]), headers, body

    async def closed(self) -> bytes:
        """What is left until the proxy closes the connection (bounded); then close ours."""
        try:
            return await asyncio.wait_for(self.reader.read(), BOUND_S)
        except ConnectionResetError:
            return b"<reset>"
        finally:
            self.close()

    def close(self) -> None:
        self.writer.close()


def error_code(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return str(error["code"])


@pytest.fixture
async def served(replicas: Factory) -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``serve()`` with the given ``server.*`` limits in front of one fake replica."""
    stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(**server: Any) -> tuple[Served, FakeReplica]:
        replica: FakeReplica = await replicas("r")
        config: Config = make_config(("r", replica.url, 4), drain_timeout_s=0, **server)
        config = dataclasses.replace(config, logging=LoggingConfig(level="warning"))
        stop = asyncio.Event()
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            serve(config, stop=stop, on_ready=lambda _h, port: ready.set_result(port)))
        stops.append((stop, task))
        port = await asyncio.wait_for(ready, BOUND_S)
        return Served("127.0.0.1", port), replica

    yield start
    for stop, task in stops:
        stop.set()
        await asyncio.wait_for(task, BOUND_S)


@pytest.fixture(params=["llhttp", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each limit must hold with either of aiohttp's request parsers."""
    if request.param == "python":
        monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser", HttpRequestParserPy)
    return str(request.param)


async def trickle(conn: Conn, data: bytes, every_s: float) -> None:
    """Send ``data`` a byte at a time (until it is all sent or the proxy hangs up)."""
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            conn.send(data[i:i + 1])
            await conn.writer.drain()
            await asyncio.sleep(every_s)


# -- header timeout ---------------------------------------------------------------------------

async def test_a_trickled_head_is_cut_with_408(served: Factory, parser: str) -> None:
    s, replica = await served(header_timeout_s=0.3)
    conn = await s.connect()
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    sender = asyncio.create_task(trickle(conn, head, 0.02))  # 4 s for the whole head
    try:
        status, headers, body = await conn.answer()
        assert not sender.done(), "the head was sent in full: it was never cut"
        assert await conn.closed() in (b"", b"<reset>")
    finally:
        sender.cancel()
        conn.close()
    assert (status, error_code(body)) == (408, "header_timeout")
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert await s.rejected("header_timeout") == 1
    assert replica.arrivals == 0


async def test_a_silent_connection_is_closed_without_an_answer(served: Factory) -> None:
    s, _ = await served(header_timeout_s=0.2)
    conn = await s.connect()
    assert await conn.closed() == b""
    assert await s.rejected("header_timeout") == 0  # no request began: nothing rejected


async def test_the_head_timer_starts_at_each_requests_first_byte(served: Factory) -> None:
    """Idle time between requests is keep-alive's, not the head's: a caller idle longer than
    header_timeout_s whose next head then arrives at once is served."""
    s, _ = await served(header_timeout_s=0.2, keepalive_timeout_s=30)
    conn = await s.connect()
    try:
        for _ in range(2):
            conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _h, body = await conn.answer()
            assert (status, body) == (200, b"ok\n")
            await asyncio.sleep(0.5)  # the stimulus: idle for longer than the head timeout
    finally:
        conn.close()


async def test_keepalive_timeout_closes_an_idle_connection(served: Factory) -> None:
    s, _ = await served(keepalive_timeout_s=0.2, header_timeout_s=30)
    conn = await s.connect()
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await conn.answer())[0] == 200
    assert await conn.closed() == b""


async def test_pipelined_requests_behind_a_long_one_are_not_cut_by_the_head_timer(
    served: Factory,
) -> None:
    """Heads already in are not timed while an earlier request on the connection works."""
    s, replica = await served(header_timeout_s=0.2)
    held = json.dumps({"hold": True}).encode()
    conn = await s.connect()
    try:
        conn.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                  b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" % (len(held), held))
        await until(lambda: replica.in_flight == 1, "the first request is at the replica")
        await asyncio.sleep(0.5)  # the stimulus: longer than header_timeout_s
        replica.gate.set()
        first, second = await conn.answer(), await conn.answer()
    finally:
        conn.close()
    assert (first[0], second[0], second[2]) == (200, 200, b"ok\n")


async def test_a_connection_in_its_lingering_close_is_closed_at_shutdown(
    replicas: Factory,
) -> None:
    """A trickler that got its 408 but never closes: the listener's shutdown closes its socket
    at once (LINGER_S is 2 s here; it would outlive the server)."""
    replica: FakeReplica = await replicas("r")
    config = make_config(("r", replica.url, 1), drain_timeout_s=0, header_timeout_s=0.2)
    config = dataclasses.replace(config, logging=LoggingConfig(level="warning"))
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, stop=stop,
                                     on_ready=lambda _h, port: ready.set_result(port)))
    conn = await Served("127.0.0.1", await asyncio.wait_for(ready, BOUND_S)).connect()
    try:
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert (await conn.answer())[0] == 408  # now lingering: our side stays open
        stop.set()
        await asyncio.wait_for(task, BOUND_S)

        async def refused() -> bool:
            # A lingering socket drops what it gets; a closed one answers with a reset, and
            # the next write fails.
            try:
                conn.send(b"X")
                await conn.writer.drain()
            except ConnectionError:
                return True
            await asyncio.sleep(0.01)
            return False

        # Well before the linger would have ended on its own.
        deadline = asyncio.get_running_loop().time() + LINGER_S / 2
        while not await refused():
            assert asyncio.get_running_loop().time() < deadline, "still lingering after shutdown"
    finally:
        conn.close()


# -- body timeout -----------------------------------------------------------------------------

async def test_a_trickled_body_is_cut_with_408(served: Factory, parser: str) -> None:
    s, replica = await served(body_timeout_s=0.3, min_body_rate=100)
    conn = await s.connect()
    conn.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    sender = asyncio.create_task(trickle(conn, b"x" * 1000, 0.02))  # 50 B/s, under 100
    try:
        status, headers, body = await conn.answer()
        assert not sender.done(), "the body was sent in full: it was never cut"
    finally:
        sender.cancel()
        conn.close()
    assert (status, error_code(body)) == (408, "body_timeout")
    assert headers["connection"] == "close"
    assert await s.rejected("body_timeout") == 1
    assert replica.arrivals == 0


async def test_a_silent_body_is_cut_with_408(served: Factory) -> None:
    s, replica = await served(body_timeout_s=0.2)
    conn = await s.connect()
    try:
        conn.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        status, _h, body = await conn.answer()
        assert await conn.closed() in (b"", b"<reset>")
    finally:
        conn.close()
    assert (status, error_code(body)) == (408, "body_timeout")
    assert replica.arrivals == 0


async def test_an_upload_at_a_real_rate_outlasts_body_timeout(served: Factory) -> None:
    """Sent over several times body_timeout_s, at 4x min_body_rate: never cut."""
    s, replica = await served(body_timeout_s=0.3, min_body_rate=10_000)
    conn = await s.connect()
    body = b'{"pad": "' + b"x" * 59_990 + b'"}'
    try:
        conn.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                  % len(body))
        for i in range(0, len(body), 10_000):
            conn.send(body[i:i + 10_000])
            await asyncio.sleep(0.25)  # 40 kB/s: 1.5 s in all, five times body_timeout_s
        status, _h, answer = await conn.answer()
    finally:
        conn.close()
    assert status == 200, answer
    assert json.loads(answer)["bytes"] == len(body)
    assert replica.completed == 1


async def test_expect_100_continue_gets_its_interim_answer_and_the_body_its_full_time(
    served: Factory,
) -> None:
    """A caller that waits for 100 Continue before its body is not a silent body."""
    s, replica = await served(body_timeout_s=0.5)
    body = b'{"a": 1}'
    conn = await s.connect()
    try:
        conn.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        interim = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), BOUND_S)
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        conn.send(body)
        status, _h, answer = await conn.answer()
    finally:
        conn.close()
    assert status == 200 and json.loads(answer)["bytes"] == len(body)
    assert replica.completed == 1


# -- head size and count --------------------------------------------------------------------

async def test_a_head_over_max_header_bytes_gets_431(served: Factory, parser: str) -> None:
    s, replica = await served(max_header_bytes=2048)
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(30))  # ~3 KB in all
    one = b"X-Big: " + b"v" * 3000 + b"\r\n"  # one line alone over the limit
    for extra, chunked in ((many, False), (many, True), (one, False)):
        conn = await s.connect()
        try:
            head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"
            if chunked:  # in pieces, so no single read holds the whole head
                for i in range(0, len(head), 500):
                    conn.send(head[i:i + 500])
                    await conn.writer.drain()
            else:
                conn.send(head)
            status, headers, body = await conn.answer()
        finally:
            conn.close()
        assert (status, error_code(body)) == (431, "headers_too_large"), (extra[:20], chunked)
        assert headers["connection"] == "close"
    assert await s.rejected("headers_too_large") == 3
    assert replica.arrivals == 0


async def test_a_head_under_the_limit_with_a_large_body_in_the_same_read_is_served(
    served: Factory,
) -> None:
    """Only the head counts against max_header_bytes, however the bytes were packed."""
    s, replica = await served(max_header_bytes=2048)
    body = b'{"pad": "' + b"x" * 100_000 + b'"}'
    extra = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(15))  # ~1.5 KB
    conn = await s.connect()
    try:
        conn.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s"
                  % (len(body), extra, body))
        status, _h, answer = await conn.answer()
    finally:
        conn.close()
    assert status == 200, answer
    assert json.loads(answer)["bytes"] == len(body) and replica.completed == 1


@pytest.mark.parametrize(("over", "expected"), [(0, 200), (1, 431)])
async def test_max_header_bytes_is_exact_when_the_blank_line_straddles_two_reads(
    served: Factory, over: int, expected: int,
) -> None:
    """A head of exactly max_header_bytes whose final CRLF comes in the next read, with body
    bytes behind it (so that read crosses the limit), is served; one byte more is not."""
    s, _ = await served(max_header_bytes=2048)
    body = b'{"pad": "' + b"x" * 100 + b'"}'
    start = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(body)
    pad = 2048 + over - len(start) - len(b"X-Pad: \r\n\r\n")
    head = start + b"X-Pad: " + b"p" * pad + b"\r\n\r\n"
    assert len(head) == 2048 + over
    conn = await s.connect()
    try:
        conn.send(head[:-2])
        await conn.writer.drain()
        # Not a synchronisation: it only makes two reads likely. Coalesced into one read, the
        # head is judged whole, and the answer must be the same.
        await asyncio.sleep(0.05)
        conn.send(head[-2:] + body)
        status, _h, answer = await conn.answer()
    finally:
        conn.close()
    assert status == expected, answer


async def test_a_long_header_line_under_max_header_bytes_is_served(served: Factory) -> None:
    """aiohttp's own default (8190 bytes a line) would refuse a 20 KB cookie; 64 KiB does not."""
    s, _ = await served()
    conn = await s.connect()
    try:
        # Answered by the proxy itself: the fake replica behind it keeps aiohttp's 8190.
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 20_000
                  + b"\r\n\r\n")
        status, _h, answer = await conn.answer()
    finally:
        conn.close()
    assert (status, answer) == (200, b"ok\n")


async def test_more_than_max_headers_gets_431_and_exactly_max_is_served(
    served: Factory, parser: str,
) -> None:
    s, replica = await served(max_headers=10)
    for count, expected in ((10, 200), (11, 431), (50, 431)):
        fields = b"Host: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(count - 1))
        conn = await s.connect()
        try:
            conn.send(b"GET /v1/models HTTP/1.1\r\n" + fields + b"\r\n")
            status, _h, body = await conn.answer()
        finally:
            conn.close()
        assert status == expected, (count, body)
        if expected == 431:
            assert error_code(body) == "headers_too_large"
    assert await s.rejected("headers_too_large") == 2
    assert replica.arrivals == 0  # GET /v1/models is answered by the proxy's listing


# -- connections ----------------------------------------------------------------------------

async def test_connections_past_max_connections_get_503_unread(served: Factory) -> None:
    s, _ = await served(max_connections=3)
    refused = 0

    async def healthz() -> bool:
        """One request on a new connection: True if served, False if refused at the door."""
        nonlocal refused
        conn = await s.connect()
        try:
            conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _h, body = await conn.answer()
        finally:
            conn.close()
        if status == 503:
            assert error_code(body) == "too_many_connections"
            refused += 1
        return status == 200

    held = [await s.connect() for _ in range(3)]
    try:
        for conn in held:  # each admitted and served (keep-alive: they stay open)
            conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await conn.answer())[0] == 200
        extra = await s.connect()  # sends nothing: the answer comes unasked
        status, headers, body = await extra.answer()
        assert (status, error_code(body)) == (503, "too_many_connections")
        assert headers["connection"] == "close" and headers["retry-after"] == "1"
        assert await extra.closed() == b""
        refused += 1
        held.pop().close()
        deadline = asyncio.get_running_loop().time() + BOUND_S
        while not await healthz():  # once the proxy has seen the close, a place is free
            assert asyncio.get_running_loop().time() < deadline, "no place freed"
    finally:
        for conn in held:
            conn.close()
    while True:  # the scrape needs a place too: the other two closes may not be seen yet
        try:
            value = await s.rejected("too_many_connections")
            break
        except ValueError:  # the scrape itself was refused (its body is not Prometheus text)
            refused += 1
    assert value == refused


# -- Host, TRACE, CONNECT, malformed --------------------------------------------------------

@pytest.mark.parametrize(
    "head",
    [
        b"GET /v1/models HTTP/1.1\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: user:pw@x\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x@evil\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
async def test_invalid_host_gets_400_and_is_not_forwarded(
    served: Factory, head: bytes, parser: str,
) -> None:
    s, replica = await served()
    conn = await s.connect()
    try:
        conn.send(head)
        status, _h, body = await conn.answer()
        assert await conn.closed() in (b"", b"<reset>")  # the answer was the last
    finally:
        conn.close()
    assert (status, error_code(body)) == (400, "bad_host")
    assert replica.arrivals == 0 and await s.rejected("bad_host") == 1


async def test_a_valid_host_is_remembered_and_an_invalid_one_never_is(served: Factory) -> None:
    """The set of Host values that passed (a fast path) holds only ones that passed."""
    s, _ = await served()
    for host, status in ((b"x", 200), (b"a b", 400), (b"x", 200), (b"a b", 400)):
        conn = await s.connect()
        try:
            conn.send(b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert (await conn.answer())[0] == status, host
        finally:
            conn.close()
    assert await s.rejected("bad_host") == 2


async def test_http10_without_host_is_served(served: Factory) -> None:
    s, _ = await served()
    conn = await s.connect()
    try:
        conn.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert (await conn.answer())[0] == 200
    finally:
        conn.close()


@pytest.mark.parametrize(
    "head",
    [
        b"TRACE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        b"TRACE /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n",
    ],
)
async def test_trace_and_connect_get_405_and_are_never_forwarded(
    served: Factory, head: bytes,
) -> None:
    s, replica = await served()
    conn = await s.connect()
    try:
        conn.send(head)
        status, headers, body = await conn.answer()
    finally:
        conn.close()
    assert (status, error_code(body)) == (405, "method_not_allowed")
    assert "TRACE" not in headers["allow"] and "CONNECT" not in headers["allow"]
    assert replica.arrivals == 0 and await s.rejected("method_not_allowed") == 1


async def test_a_malformed_request_gets_an_openai_style_400(served: Factory, parser: str) -> None:
    s, _ = await served()
    conn = await s.connect()
    try:
        conn.send(b"GARBAGE\r\n\r\n")
        status, headers, body = await conn.answer()
    finally:
        conn.close()
    assert status == 400 and headers["content-type"] == "application/json"
    assert error_code(body) == "bad_request"
    assert await s.rejected("bad_request") == 1


# -- send timeout -----------------------------------------------------------------------------

async def test_a_caller_that_stops_reading_loses_its_slot_after_send_timeout(
    served: Factory,
) -> None:
    """upstream.read_timeout_s is long (30 s); server.send_timeout_s alone frees the slot and
    makes the engine abort."""
    s, replica = await served(send_timeout_s=0.3)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (s.host, s.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps({"stream": True, "events": 400, "pad": 65536}).encode()  # ~26 MB
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await until(lambda: replica.arrivals == 1, "the stream started")
        await until(lambda: replica.aborted == 1, "the engine saw its request abandoned")
    finally:
        writer.close()
    assert replica.completed == 0
    assert await s.metric("batchgate_replica_in_flight", replica="r") == 0
    assert await s.metric("batchgate_client_disconnects_total", stage="streaming") == 1
    del reader
