"""The upstream HTTP/1.1 client's parser, fed by hand: no sockets.

Every response is fed whole, byte by byte and in random splits (hypothesis): the parse must not
depend on where TCP happened to cut the stream.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.errors import UpstreamError, UpstreamTimeout
from proxy.upstream.connection import _HIGH_WATER, Response, _Connection
from proxy.upstream.pool import IDLE_EXPIRY_S, ConnectionPool


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False
        self.reading_paused = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0


@dataclass
class Parsed:
    response: Response
    body: bytes
    conn: _Connection
    transport: FakeTransport
    pool: ConnectionPool


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    out, at = [], 0
    for step in cuts:
        if at >= len(data):
            break
        out.append(data[at : at + step])
        at += step
    if at < len(data):
        out.append(data[at:])
    return out


def new_conn(loop: asyncio.AbstractEventLoop) -> tuple[ConnectionPool, _Connection, FakeTransport]:
    pool = ConnectionPool("http://replica:8000", limit=2, connect_timeout_s=1, read_timeout_s=30)
    conn = _Connection(pool, loop)
    transport = FakeTransport()
    conn.connection_made(transport)
    pool._active += 1  # as ConnectionPool.request does for a connection it hands out
    return pool, conn, transport


async def feed(
    raw: bytes, cuts: list[int] | None = None, *, method: str = "GET", eof: bool = False,
) -> Parsed:
    """Send a request on a fake connection, feed ``raw`` in pieces, read the body to its end."""
    pool, conn, transport = new_conn(asyncio.get_running_loop())
    task = conn.start(b"GET / HTTP/1.1\r\n\r\n", b"", method == "HEAD")
    await asyncio.sleep(0)
    for piece in pieces(raw, cuts if cuts is not None else [len(raw)]):
        conn.data_received(piece)
    if eof:
        conn.eof_received()
        conn.connection_lost(None)
    response = await task
    body = b""
    while chunk := await response.readany():
        body += chunk
    return Parsed(response, body, conn, transport, pool)


def byte_by_byte(raw: bytes) -> list[int]:
    return [1] * len(raw)


CL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n6;q=\"x;y\"\r\n world\r\nA\r\n0123456789\r\n"
    b"0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n"
)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + CL
DUPES = (
    b"HTTP/1.1 201 Created\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nContent-Length: 2\r\n"
    b"X-Empty:\r\nX-Spaces: \t padded \t\r\n\r\nok"
)
# (raw response, expected status, expected body, keep-alive afterwards)
VALID = [
    (CL, 200, b"hello", True),
    (CHUNKED, 200, b"hello world0123456789", True),
    (CONTINUE, 200, b"hello", True),
    (DUPES, 201, b"ok", True),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n", 204, b"", True),
    (b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n", 304, b"", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200, b"", True),
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 1\r\n\r\nx", 200,
     b"x", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc", 200, b"abc", False),
]


@pytest.mark.parametrize(("raw", "status", "body", "keep_alive"), VALID)
@pytest.mark.parametrize("split", ["whole", "bytes"])
async def test_valid_responses(
    raw: bytes, status: int, body: bytes, keep_alive: bool, split: str
) -> None:
    parsed = await feed(raw, byte_by_byte(raw) if split == "bytes" else None)
    assert (parsed.response.status, parsed.body, parsed.conn.keep_alive) == (
        status, body, keep_alive)
    assert parsed.response.complete


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(VALID), cuts=st.lists(st.integers(1, 40), max_size=60))
def test_random_splits(case: tuple[bytes, int, bytes, bool], cuts: list[int]) -> None:
    raw, status, body, keep_alive = case
    whole = asyncio.run(feed(raw))
    parsed = asyncio.run(feed(raw, cuts))
    assert (parsed.response.status, parsed.body, parsed.conn.keep_alive) == (
        status, body, keep_alive)
    assert list(parsed.response.headers.items()) == list(whole.response.headers.items())
    assert parsed.response.complete and whole.response.complete


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(1, 40), max_size=60))
def test_close_delimited_body_ends_at_eof(cuts: list[int]) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\ndata: 2\n\n"
    parsed = asyncio.run(feed(raw, cuts, eof=True))
    assert parsed.body == b"data: 1\n\ndata: 2\n\n"
    assert parsed.response.complete and not parsed.conn.keep_alive


async def _serve_in_turn(
    conn: _Connection, raws: list[bytes], cuts: list[int], head: int | None = None,
) -> list[tuple[int, bytes]]:
    """One request after another on the same keep-alive connection, each answer fed in
    ``cuts`` pieces and read to its end (request ``head`` is a HEAD)."""
    out = []
    for i, raw in enumerate(raws):
        task = conn.start(b"GET / HTTP/1.1\r\n\r\n", b"", i == head)
        for piece in pieces(raw, cuts):
            conn.data_received(piece)
        response = await task
        body = b""
        while chunk := await response.readany():
            body += chunk
        out.append((response.status, body))
        assert response.complete and conn.keep_alive
        response.release()
        assert conn.pool.idle == 1
        conn.pool._idle.pop()  # handed out again, as ConnectionPool.request does
        conn.pool._active += 1
    return out


KEPT = [case for case in VALID if case[3]]


@settings(max_examples=100, deadline=None)
@given(order=st.lists(st.sampled_from(KEPT), min_size=2, max_size=6),
       cuts=st.lists(st.integers(1, 40), max_size=60))
def test_responses_in_turn_on_one_connection(
    order: list[tuple[bytes, int, bytes, bool]], cuts: list[int],
) -> None:
    """Each answer on a reused connection is framed as if it were the first (the parser
    of a chunked answer llhttp ended is kept for the next one)."""
    async def run() -> list[tuple[int, bytes]]:
        _, conn, _ = new_conn(asyncio.get_running_loop())
        return await _serve_in_turn(conn, [raw for raw, *_ in order], cuts)

    assert asyncio.run(run()) == [(status, body) for _, status, body, _ in order]


async def test_after_chunked_answers_malformed_and_head_ones_are_still_caught() -> None:
    for after in (CHUNKED, CL):
        _, conn, transport = new_conn(asyncio.get_running_loop())
        # A HEAD answer that announces a chunked body has none: the next answer is read fresh.
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert await _serve_in_turn(conn, [CHUNKED, head, CHUNKED, after], [1000], head=1) == [
            (200, b"hello world0123456789"), (200, b""), (200, b"hello world0123456789"),
            (200, b"hello world0123456789" if after is CHUNKED else b"hello")]
        task = conn.start(b"GET / HTTP/1.1\r\n\r\n", b"", False)
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        with pytest.raises(UpstreamError) as info:
            await task  # malformed from its first body byte: the request itself fails
        assert info.value.kind == "malformed" and transport.closed


@pytest.mark.parametrize("cut", [20, 40, 47, 60])
async def test_version_of_a_final_head_in_pieces_after_a_whole_interim_one(cut: int) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    final = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    parsed = await feed(interim + final, [len(interim) + cut])
    assert (parsed.response.version, parsed.body, parsed.conn.keep_alive) == (
        (1, 0), b"abc", False)


async def test_head_response_has_no_body_despite_content_length() -> None:
    parsed = await feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", method="HEAD")
    assert parsed.body == b"" and parsed.response.complete and parsed.conn.keep_alive


async def test_headers_keep_duplicates_names_and_reason() -> None:
    parsed = await feed(DUPES)
    headers = parsed.response.headers
    assert headers.getall("SET-COOKIE") == ["a=1", "b=2"]
    assert [k for k, _ in headers.items()][:2] == ["Set-Cookie", "set-cookie"]
    assert headers["X-Empty"] == "" and headers["X-Spaces"] == "padded"
    assert parsed.response.reason == "Created" and parsed.response.version == (1, 1)


async def test_http10_version() -> None:
    parsed = await feed(b"HTTP/1.0 200 OK\r\n\r\nuntil eof", eof=True)
    assert parsed.response.version == (1, 0) and parsed.body == b"until eof"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",  # obs-fold
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-\xe9: x\r\n\r\n",  # a name is ASCII (it is decoded as such)
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
    ],
)
async def test_malformed_responses_close_the_connection(raw: bytes) -> None:
    with pytest.raises(UpstreamError):
        await feed(raw, byte_by_byte(raw))


async def test_truncated_bodies_raise_after_the_bytes_that_did_arrive() -> None:
    for raw in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ):
        pool, conn, _transport = new_conn(asyncio.get_running_loop())
        task = conn.start(b"GET / HTTP/1.1\r\n\r\n", b"", False)
        await asyncio.sleep(0)
        conn.data_received(raw)
        response = await task
        assert await response.readany() == b"abc"
        conn.connection_lost(None)
        with pytest.raises(UpstreamError):
            await response.readany()
        assert not response.complete
        response.release()  # incomplete: closed, not pooled
        assert (pool.active, pool.idle) == (0, 0)


@pytest.mark.parametrize("raw", [CL, CHUNKED])
async def test_a_lost_connection_is_freed_by_reference_counting(raw: bytes) -> None:
    """Its parser's callbacks and its read timer's hold its bound methods: left in place,
    each connection a replica closes (llama.cpp's server: after every stream) would be a
    cycle only the cycle collector frees, in pauses that grow with the load."""
    gc.collect()
    gc.disable()
    try:
        parsed = await feed(raw)
        conn = weakref.ref(parsed.conn)
        parsed.conn.connection_lost(None)
        del parsed
        assert conn() is None, gc.get_referrers(conn())
    finally:
        gc.enable()


async def test_a_connection_lost_before_its_request_fails_it_at_once_as_unsent() -> None:
    """A replica that accepts and closes at once: the loss can reach the connection before
    the task that connected writes on it. Its timer is gone with it, so a request started
    there would wait forever with its slot held; nothing was written, so it may go again."""
    _, conn, transport = new_conn(asyncio.get_running_loop())
    conn.connection_lost(None)
    with pytest.raises(UpstreamError) as info:
        await asyncio.wait_for(conn.start(b"POST / HTTP/1.1\r\n\r\n", b"{}", False), 1)
    assert (info.value.kind, info.value.unsent) == ("reset", True)
    assert transport.written == []


async def test_a_request_is_not_written_into_a_closing_transport() -> None:
    """A reset marks the transport closing at once but reaches connection_lost a loop step
    later: a write in between is dropped, and the request would fail as possibly delivered."""
    _, conn, transport = new_conn(asyncio.get_running_loop())
    transport.closed = True  # closing; connection_lost not delivered yet
    with pytest.raises(UpstreamError) as info:
        conn.start(b"POST / HTTP/1.1\r\n\r\n", b"{}", False)
    assert (info.value.kind, info.value.unsent) == ("reset", True)
    assert transport.written == []


async def test_a_connection_lost_while_connecting_is_not_kept_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()

    async def accept_then_close(factory: Any, *args: Any, **kwargs: Any) -> Any:
        protocol = factory()
        transport = FakeTransport()
        protocol.connection_made(transport)
        protocol.connection_lost(None)  # delivered before the connecting task resumes
        return transport, protocol

    monkeypatch.setattr(loop, "create_connection", accept_then_close)
    pool = ConnectionPool("http://replica:8000", limit=2, connect_timeout_s=1, read_timeout_s=30)
    with pytest.raises(UpstreamError) as info:
        await asyncio.wait_for(pool.request("POST", "/v1/completions", [], b"{}"), 1)
    assert info.value.unsent
    assert (pool.active, pool.idle, len(pool._open)) == (0, 0, 0)


async def test_eof_before_any_byte_may_have_been_delivered() -> None:
    """The request was written: whether the replica read it is unknown (issue 7 A2)."""
    for raw in (b"", b"HTTP/1.1 200"):
        with pytest.raises(UpstreamError) as info:
            await feed(raw, eof=True)
        assert (info.value.kind, info.value.unsent) == ("reset", False)


async def test_release_pools_only_complete_keep_alive_responses() -> None:
    parsed = await feed(CL)
    parsed.response.release()
    parsed.response.release()  # idempotent
    parsed.response.close()  # after release: must not touch the now-pooled connection
    assert (parsed.pool.active, parsed.pool.idle, parsed.transport.closed) == (0, 1, False)

    parsed = await feed(VALID[7][0])  # Connection: close
    parsed.response.release()
    assert (parsed.pool.active, parsed.pool.idle, parsed.transport.closed) == (0, 0, True)


async def test_bytes_after_the_response_make_the_connection_unusable() -> None:
    parsed = await feed(CL + b"HTTP/1.1 200 OK\r\n")
    parsed.response.release()
    assert (parsed.pool.idle, parsed.transport.closed) == (0, True)


async def test_flow_control_pauses_reading_until_drained() -> None:
    pool, conn, transport = new_conn(asyncio.get_running_loop())
    size = 3 * _HIGH_WATER
    task = conn.start(b"GET / HTTP/1.1\r\n\r\n", b"", False)
    await asyncio.sleep(0)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    response = await task
    chunk = b"x" * 65536
    for _ in range(_HIGH_WATER // len(chunk) + 1):
        conn.data_received(chunk)
    assert transport.reading_paused
    got = await response.readany()
    assert len(got) == _HIGH_WATER + len(chunk) and not transport.reading_paused
    response.close()
    assert (pool.active, transport.closed) == (0, True)


async def test_request_head_is_one_write_with_host_and_content_length() -> None:
    loop = asyncio.get_running_loop()
    pool = ConnectionPool("http://replica:8000/prefix/", limit=1, connect_timeout_s=1,
                          read_timeout_s=30)
    conn = _Connection(pool, loop)
    transport = FakeTransport()
    conn.connection_made(transport)

    async def connect() -> _Connection:
        return conn

    pool._connect = connect  # type: ignore[method-assign]
    task = asyncio.ensure_future(
        pool.request("POST", "/v1/x?a=%20", [("X-A", "1"), ("x-a", "2")], b"{}"))
    await asyncio.sleep(0)
    assert transport.written == [
        b"POST /prefix/v1/x?a=%20 HTTP/1.1\r\nHost: replica:8000\r\nX-A: 1\r\nx-a: 2\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    ]
    assert pool.active == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (pool.active, pool.idle, transport.closed) == (0, 0, True)  # cancelled: not pooled


async def test_get_without_body_sends_no_content_length_and_header_injection_is_refused() -> None:
    pool, conn, transport = new_conn(asyncio.get_running_loop())
    pool._active -= 1

    async def connect() -> _Connection:
        return conn

    pool._connect = connect  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="CR, LF"):
        await pool.request("GET", "/", [("X-A", "1\r\nX-Evil: 1")], b"")
    task = asyncio.ensure_future(pool.request("GET", "/", [], b""))
    await asyncio.sleep(0)
    assert transport.written == [b"GET / HTTP/1.1\r\nHost: replica:8000\r\n\r\n"]
    conn.data_received(CL)
    response = await task
    assert await response.readany() == b"hello"
    response.release()
    assert (pool.active, pool.idle) == (0, 1)
    await pool.close()
    with pytest.raises(UpstreamError) as info:
        await pool.request("GET", "/", [], b"")
    assert (info.value.kind, info.value.unsent) == ("connect", True)


def test_base_url_is_validated() -> None:
    for bad in ("ftp://x", "http://", "http://u:p@x/", "http://x/?q=1"):
        with pytest.raises(ValueError, match="base_url"):
            ConnectionPool(bad, limit=1, connect_timeout_s=1, read_timeout_s=1)
    with pytest.raises(ValueError, match="limit"):
        ConnectionPool("http://x", limit=0, connect_timeout_s=1, read_timeout_s=1)
    assert repr(ConnectionPool("http://x", limit=1, connect_timeout_s=1, read_timeout_s=1)) == (
        "<ConnectionPool http://x active=0 idle=0 limit=1>")


# -- read timer on an injected clock ---------------------------------------------------------


class FakeTimer:
    def __init__(self, when: float, callback: Any, args: tuple[Any, ...]) -> None:
        self.when, self.callback, self.args, self.dead = when, callback, args, False

    def cancel(self) -> None:
        self.dead = True

    def cancelled(self) -> bool:
        return self.dead


class FakeLoop:
    """The parts of an event loop a connection uses, on a clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []
        self.real = asyncio.get_running_loop()

    def time(self) -> float:
        return self.now

    def create_future(self) -> asyncio.Future[Any]:
        return self.real.create_future()

    def call_at(self, when: float, callback: Any, *args: Any) -> FakeTimer:
        timer = FakeTimer(when, callback, args)
        self.timers.append(timer)
        return timer

    def call_later(self, delay: float, callback: Any, *args: Any) -> FakeTimer:
        return self.call_at(self.now + delay, callback, *args)

    async def advance_to(self, when: float) -> None:
        """Run every timer due up to ``when`` in order, then let the tasks react."""
        for _ in range(1000):
            due = [t for t in self.timers if not t.dead and t.when <= when]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.now = max(self.now, timer.when)
            timer.callback(*timer.args)
        else:
            raise AssertionError("a timer re-arms itself in the past, again and again")
        self.now = when
        for _ in range(5):
            await asyncio.sleep(0)

    def armed(self) -> int:
        return len([t for t in self.timers if not t.dead])


def fake_pool(
    loop: FakeLoop, read_timeout_s: float
) -> tuple[ConnectionPool, _Connection, FakeTransport]:
    """A pool whose one connection lives on ``loop`` and writes to a FakeTransport."""
    pool = ConnectionPool("http://replica:8000", limit=2, connect_timeout_s=1,
                          read_timeout_s=read_timeout_s)
    conn = _Connection(pool, loop)  # type: ignore[arg-type]
    transport = FakeTransport()
    conn.connection_made(transport)

    async def connect() -> _Connection:
        return conn

    pool._connect = connect  # type: ignore[method-assign]
    return pool, conn, transport


async def test_large_upload_then_next_request_is_judged_by_its_own_silence() -> None:
    """A >1 MiB body once armed the read timer twice; the orphan later timed out the next
    request on the pooled connection after less silence than read_timeout_s (issue 7 A1)."""
    loop = FakeLoop()
    pool, conn, _transport = fake_pool(loop, read_timeout_s=2.0)
    first = asyncio.ensure_future(pool.request("POST", "/", [], b"x" * (2 << 20)))
    await loop.advance_to(0.0)  # the request is written at t=0
    await loop.advance_to(0.5)
    conn.data_received(CL)
    response = await first
    assert await response.readany() == b"hello"
    response.release()
    # Not measuring any more; the one handle stays pending (due t=2), to serve the next request.
    assert (pool.active, pool.idle, pool.armed_timers(), loop.armed()) == (0, 1, 0, 1)

    await loop.advance_to(1.0)
    second = asyncio.ensure_future(pool.request("GET", "/", [], b""))
    await loop.advance_to(1.0)  # written at t=1
    await loop.advance_to(2.9)  # 1.9 s of silence for this request: not yet a timeout
    assert not second.done(), second
    assert loop.armed() == 1  # one timer owner per connection
    await loop.advance_to(3.1)
    with pytest.raises(UpstreamTimeout):
        await second
    assert (pool.active, pool.idle) == (0, 0)


async def test_idle_connection_handle_expires_and_the_next_request_arms_its_own() -> None:
    """The handle a request leaves pending judges nobody once the connection is idle: it expires
    without a timeout, and the next request is timed from its own start (issue 7 A1)."""
    loop = FakeLoop()
    pool, conn, _transport = fake_pool(loop, read_timeout_s=2.0)
    first = asyncio.ensure_future(pool.request("GET", "/", [], b""))
    await loop.advance_to(0.0)
    conn.data_received(CL)
    response = await first
    assert await response.readany() == b"hello"
    response.release()
    # The pending handle (due t=2) fired on an idle connection, still pooled at t=3 (idle
    # connections are retired after IDLE_EXPIRY_S, 4 s: the next request reuses this one).
    await loop.advance_to(3.0)
    assert (pool.idle, loop.armed(), conn.usable) == (1, 0, True)

    second = asyncio.ensure_future(pool.request("GET", "/", [], b""))
    await loop.advance_to(3.0)
    assert (pool.idle, loop.armed()) == (0, 1)
    await loop.advance_to(4.9)
    assert not second.done(), second
    await loop.advance_to(5.1)
    with pytest.raises(UpstreamTimeout):
        await second



ODD_RESPONSES = {
    "nul_in_header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "control_byte_in_header": b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",
    "head_70k": (b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * (70 * 1024)
                 + b"\r\nContent-Length: 2\r\n\r\nok"),
    "many_headers_70k": (b"HTTP/1.1 200 OK\r\n" + b"X-P: 123456789\r\n" * 4600
                         + b"Content-Length: 2\r\n\r\nok"),
    "chunk_line_9k": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;"
                      + b"e" * (9 * 1024) + b"\r\nok\r\n0\r\n\r\n"),
    "trailer_line_9k": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
                        b"0\r\nX-T: " + b"t" * (9 * 1024) + b"\r\n\r\n"),
    "gzip_chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                     b"2\r\nok\r\n0\r\n\r\n"),
    "status_below_100": b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok",
}


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(sorted(ODD_RESPONSES)),
       cuts=st.lists(st.integers(1, 9000), max_size=30))
def test_malformed_whatever_the_read_boundaries(case: str, cuts: list[int]) -> None:
    """The same responses in any split across reads: always malformed, connection discarded."""
    async def run() -> None:
        _pool, conn, transport = new_conn(asyncio.get_running_loop())
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", b"", False)
        for piece in pieces(ODD_RESPONSES[case], cuts):
            conn.data_received(piece)
        with pytest.raises(UpstreamError) as info:
            response = await waiter
            while await response.readany():
                pass
        assert info.value.kind == "malformed"
        assert transport.closed and not conn.usable  # discarded, never pooled

    asyncio.run(run())




# -- guards against mutations of the timers and the pool (issue 7 part C) --------------------


async def test_idle_connection_past_idle_expiry_is_not_reused() -> None:
    loop = FakeLoop()
    pool = ConnectionPool("http://replica:8000", limit=4, connect_timeout_s=1, read_timeout_s=30)
    made: list[tuple[_Connection, FakeTransport]] = []

    async def connect() -> _Connection:
        conn = _Connection(pool, loop)  # type: ignore[arg-type]
        transport = FakeTransport()
        conn.connection_made(transport)
        made.append((conn, transport))
        return conn

    pool._connect = connect  # type: ignore[method-assign]

    async def get() -> _Connection:
        task = asyncio.ensure_future(pool.request("GET", "/", [], b""))
        await loop.advance_to(loop.now)
        made[-1][0].data_received(CL)
        response = await task
        conn = response._conn
        assert await response.readany() == b"hello"
        response.release()
        return conn

    first = await get()
    await loop.advance_to(IDLE_EXPIRY_S - 0.1)
    assert await get() is first  # still warm: reused
    await loop.advance_to(loop.now + IDLE_EXPIRY_S + 0.1)
    assert await get() is not first  # too old: a new connection, the old one closed
    assert made[0][1].closed and len(made) == 2
    assert pool.pooling  # expiry is ours, not the replica closing early


class PausingTransport(FakeTransport):
    """Pauses the protocol's writing on a large write, as a full socket buffer does."""

    protocol: _Connection | None = None

    def write(self, data: Any) -> None:
        super().write(data)
        if len(data) > 1024 * 1024 and self.protocol is not None:
            self.protocol.pause_writing()


async def test_a_replica_taking_a_slow_upload_is_not_silent() -> None:
    """Each resume_writing is a sign of life: an upload taken slowly, never stalled for
    read_timeout_s, does not time out; once it stalls, it does."""
    loop = FakeLoop()
    pool = ConnectionPool("http://replica:8000", limit=2, connect_timeout_s=1, read_timeout_s=2)
    conn = _Connection(pool, loop)  # type: ignore[arg-type]
    transport = PausingTransport()
    transport.protocol = conn
    conn.connection_made(transport)

    async def connect() -> _Connection:
        return conn

    pool._connect = connect  # type: ignore[method-assign]
    task = asyncio.ensure_future(pool.request("POST", "/", [], b"x" * (2 << 20)))
    await loop.advance_to(0.0)
    for at in (1.5, 3.0, 4.5):  # the replica takes a little, the buffer fills again
        await loop.advance_to(at)
        conn.resume_writing()
        conn.pause_writing()
    await loop.advance_to(6.4)
    assert not task.done()  # 1.9 s since the replica last took bytes
    await loop.advance_to(6.6)
    with pytest.raises(UpstreamTimeout):
        await task


async def test_resume_after_a_slow_reader_restarts_the_silence_clock() -> None:
    """A reader that paused the socket for longer than read_timeout_s: the replica's
    silence is counted from the resume, not from the last byte before the pause."""
    loop = FakeLoop()
    pool, conn, transport = fake_pool(loop, read_timeout_s=2.0)
    task = asyncio.ensure_future(pool.request("GET", "/", [], b""))
    await loop.advance_to(0.0)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * _HIGH_WATER))
    response = await task
    conn.data_received(b"x" * (_HIGH_WATER + 1))  # past high water: reading paused
    assert transport.reading_paused
    await loop.advance_to(5.0)  # the caller reads nothing for 5 s: not the replica's fault
    assert len(await response.readany()) == _HIGH_WATER + 1  # resumes at t=5
    assert not transport.reading_paused
    await loop.advance_to(6.9)
    assert conn.error is None  # 1.9 s of the replica's silence since the resume
    await loop.advance_to(7.5)
    with pytest.raises(UpstreamTimeout):
        await response.readany()


async def test_set_limit_follows_the_replica_cap() -> None:
    """The limit can change live (a replica's cap reloaded): idle connections beyond a lower
    limit are closed at once (the coldest first), checked-out ones finish their request."""
    loop = FakeLoop()
    pool = ConnectionPool("http://replica:8000", limit=4, connect_timeout_s=1, read_timeout_s=30)
    made: list[FakeTransport] = []

    async def connect() -> _Connection:
        conn = _Connection(pool, loop)  # type: ignore[arg-type]
        transport = FakeTransport()
        conn.connection_made(transport)
        made.append(transport)
        return conn

    pool._connect = connect  # type: ignore[method-assign]
    tasks = [asyncio.ensure_future(pool.request("GET", "/", [], b"", fresh=False))
             for _ in range(3)]
    await loop.advance_to(0.0)
    assert pool.active == 3
    pool.set_limit(2)  # lower than what is in flight: nothing is cut
    assert (pool.limit, pool.active) == (2, 3)
    with pytest.raises(RuntimeError, match="limit=2"):
        await pool.request("GET", "/", [], b"")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert (pool.active, pool.idle) == (0, 0)

    pool.set_limit(4)
    for _ in range(3):  # three warm connections back in the pool
        pool._idle.append(await connect())
    pool.set_limit(1)
    assert pool.idle == 1 and [t.closed for t in made[-3:]] == [True, True, False]
    with pytest.raises(ValueError, match="limit"):
        pool.set_limit(0)
    assert "limit=1" in repr(pool)
