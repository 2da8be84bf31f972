"""Keep-alive connections to one replica, with a limit that follows its cap.

What always holds: a request is written only on a connection not known to be closed (an
idle one is checked with a non-blocking peek first), so the only failures left after a
write are ones where the replica may have read the request; a replica that closes
connections it advertised as keep-alive sooner than they are reused is learnt once, and
its connections are then used for one request each.
"""

from __future__ import annotations

import asyncio
import errno
import ssl as ssl_
from collections import deque
from collections.abc import Sequence
from urllib.parse import urlsplit

from proxy.core.errors import Overloaded, UpstreamError
from proxy.upstream.connection import LARGE_BODY, _Connection
from proxy.upstream.response import Response

_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})

#: Idle pooled connections are not reused past this age: uvicorn (vLLM) closes idle
#: keep-alive connections after 5 s, and reusing one just then races its close. A replica
#: that closes one sooner than this is one that closes after responses: pooling stops.
IDLE_EXPIRY_S = 4.0
#: How long a connection that just carried an event stream is held back before its first
#: reuse, until the replica has shown it keeps such connections open (see _take_idle).
STREAM_PROBATION_S = 0.1
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class ConnectionPool:
    """Keep-alive connections to one origin (``http://`` or ``https://``, optional prefix).

    At most ``limit`` connections are open at once: the proxy holds a slot per request, so a
    request beyond ``limit`` in flight is a bug and raises RuntimeError. Idle connections are
    closed to make room for a fresh one. ``ssl`` (a context) turns TLS on, with SNI from
    ``server_hostname`` (default: the URL's host).
    """

    def __init__(
        self,
        base_url: str,
        *,
        limit: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        name: str | None = None,
        ssl: ssl_.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname or url.username or url.query:
            raise ValueError(f"base_url must be http(s)://host[:port][/prefix], got {base_url!r}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.base_url = base_url
        self.name = name or base_url
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        if url.scheme == "https" and ssl is None:
            ssl = ssl_.create_default_context()
        self._ssl = ssl
        self._server_hostname = (server_hostname or url.hostname) if ssl is not None else None
        self._prefix = url.path.rstrip("/")
        self._host_header = url.netloc
        self._limit = limit
        self._connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()  # every connection not yet lost
        self._active = 0
        self._closed = False
        #: True once a connection that carried an event stream was still open, unused,
        #: STREAM_PROBATION_S later: then connections are reused at once after streams too.
        self.streams_keep_alive = False
        #: False once the replica was seen closing a keep-alive connection before it
        #: expired: from then on each connection carries one request.
        self.pooling = True

    def __repr__(self) -> str:
        pooling = "" if self.pooling else " pooling=off"
        return (f"<ConnectionPool {self.base_url} active={self._active} idle={len(self._idle)}"
                f" limit={self._limit}{pooling}>")

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def active(self) -> int:
        return self._active

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        """Follow a new cap of the replica (live reload). Requests in flight finish; idle
        connections beyond the new limit are closed now, the coldest first."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._limit = limit
        while self._idle and self._active + len(self._idle) > limit:
            victim = self._idle.popleft()
            if victim.transport is not None:
                victim.transport.close()

    def armed_timers(self) -> int:
        """Read timers running on this pool's connections (0 when nothing is in flight)."""
        return sum(conn.timer.armed for conn in self._open)

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes,
        *, fresh: bool = False,
    ) -> Response:
        """Send one request; return once the final response's status line and headers are in.

        Raises :class:`UpstreamError` (``unsent`` when not one byte was written) or
        :class:`UpstreamTimeout`.
        """
        if self._closed:
            raise UpstreamError(f"pool for {self.base_url} is closed", kind="connect",
                                replica=self.name, unsent=True)
        # One C-level join, no Python loop per field (a value's own CR or LF is caught below).
        lines = "\r\n".join(map(": ".join, headers)) + "\r\n" if headers else ""
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers) or (
            "\r" in target or "\n" in target or " " in target
        ):
            raise ValueError("CR, LF or space inside a request target or header")
        length = f"Content-Length: {len(body)}\r\n" if body or method in _BODY_METHODS else ""
        head = (f"{method} {self._prefix}{target} HTTP/1.1\r\nHost: {self._host_header}\r\n"
                f"{lines}{length}\r\n").encode("utf-8", "surrogateescape")
        conn = None if fresh else self._take_idle()
        if conn is None:
            self._make_room()
            conn = await self._connect()
            conn.fresh = fresh or not self.pooling
        self._active += 1
        try:
            waiter = conn.start(head, body, method == "HEAD")
            if len(body) > LARGE_BODY:
                await conn.drain()
            return await waiter
        except BaseException:
            conn.checkin(False)  # failed or cancelled: never back to the pool
            raise

    def _take_idle(self) -> _Connection | None:
        held: list[_Connection] | None = None
        try:
            while self._idle:
                conn = self._idle.pop()  # LIFO: the warmest connection, least likely timed out
                idle_for = conn.loop.time() - conn.idle_since
                if (conn.after_stream and not self.streams_keep_alive
                        and idle_for < STREAM_PROBATION_S):
                    # llama.cpp's server closes the connection right behind a stream's last
                    # event while advertising keep-alive, too soon for a peek to see: a
                    # request written now would be lost. Held back until the replica has
                    # shown that it keeps connections open after streams.
                    held = held or []
                    held.append(conn)
                    continue
                if (conn.usable and conn.transport is not None
                        and not conn.transport.is_closing() and idle_for < IDLE_EXPIRY_S):
                    # Did the replica close it (EOF or RST, or stray bytes are already in the
                    # kernel) though the loop has not processed it yet? One non-blocking
                    # poll(2) before a single byte of the next request is written: an idle
                    # connection that is readable at all is not reusable, whatever it would
                    # read. (Inline, not a method: a call fewer per request.)
                    poll = conn.poll
                    if poll is None or not poll.poll(0):
                        if conn.after_stream:
                            self.streams_keep_alive = True  # it survived: learnt for good
                            conn.after_stream = False
                        return conn
                    self._closed_early(idle_for)
                if conn.transport is not None:
                    conn.transport.close()
            return None
        finally:
            if held:
                self._idle.extend(reversed(held))  # back in place, warmest last

    def _closed_early(self, idle_for: float) -> None:
        # Closed by the replica while idle, sooner than we would have retired it: it closes
        # connections after responses (llama.cpp after every stream, keep-alive or not).
        if idle_for < IDLE_EXPIRY_S:
            self.pooling = False

    def _make_room(self) -> None:
        if self._active >= self._limit:
            raise RuntimeError(f"{self!r}: more than limit={self._limit} requests in flight")
        while self._idle and self._active + len(self._idle) >= self._limit:
            victim = self._idle.popleft()  # the coldest one makes room
            if victim.transport is not None:
                victim.transport.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        self._active += 1  # a slot while connecting, so concurrent connects count too
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, loop), self._host, self._port,
                    ssl=self._ssl, server_hostname=self._server_hostname)
        except (OSError, ssl_.SSLError) as err:  # refused, unreachable, DNS, TLS; timeouts
            if err.errno in _OUT_OF_DESCRIPTORS:
                # Our own process (or the host) is out of sockets: the replica is fine.
                raise Overloaded(f"batchgate is out of file descriptors: {err}",
                                 retry_after_s=1) from err
            detail = str(err) or type(err).__name__
            raise UpstreamError(f"replica {self.name}: connect to {self.base_url}: {detail}",
                                kind="connect", replica=self.name, unsent=True) from err
        finally:
            self._active -= 1
        if not conn.lost:  # lost already: its connection_lost has run, nothing would drop it
            self._open.add(conn)
        return conn

    def checkin(self, conn: _Connection, reuse: bool) -> None:
        self._active -= 1
        if reuse and self.pooling and not self._closed:
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def lost(self, conn: _Connection) -> None:
        self._open.discard(conn)
        # An idle connection closed by the server: drop it (an active one is checked in later).
        if conn in self._idle:
            self._idle.remove(conn)
            self._closed_early(conn.loop.time() - conn.idle_since)

    async def close(self) -> None:
        """Close all idle connections; further requests raise UpstreamError (connect)."""
        self._closed = True
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)  # let the transports run connection_lost
