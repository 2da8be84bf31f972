"""The head of a replica's final response, and its body read as it arrives.

What always holds: a Response is ended exactly once, by :meth:`Response.release` (its
connection may go back to the pool) or :meth:`Response.close` (it is closed); a cancelled
read closes it, since half a body is left on the connection.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from multidict import CIMultiDict, istr

if TYPE_CHECKING:
    from proxy.upstream.connection import _Connection

_CONTENT_TYPE = istr("Content-Type")  # no case folding per lookup


class Response:
    """Status line and headers of a final response; the body is read with :meth:`readany`.

    The caller must end it with :meth:`release` (body read to its end) or :meth:`close`.
    """

    __slots__ = ("_conn", "_ended", "complete", "headers", "reason", "status", "version")

    def __init__(
        self, conn: _Connection, status: int, reason: str, headers: CIMultiDict[str],
        version: tuple[int, int],
    ) -> None:
        self._conn = conn
        self._ended = False  # released or closed: the connection is no longer ours
        self.status = status
        self.reason = reason
        self.headers = headers
        self.version = version
        self.complete = False  # body fully received (set by the connection)

    def __repr__(self) -> str:
        return f"<Response {self.status} complete={self.complete} ended={self._ended}>"

    async def readany(self) -> bytes:
        """Next available body bytes (all that is buffered, joined); b"" at the end."""
        conn = self._conn
        while True:
            if self._ended:
                if self.complete:
                    return b""
                raise conn.failure("response was closed before its body was read")
            body = conn.body
            if body:
                data = body.popleft() if len(body) == 1 else b"".join(body)
                body.clear()
                conn.buffered = 0
                if conn.paused:
                    conn.resume()
                return data
            if self.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            waiter = conn.body_waiter = conn.loop.create_future()
            try:
                await waiter
            except asyncio.CancelledError:
                self.close()  # half a body on it: never reusable
                raise
            finally:
                conn.body_waiter = None

    def release(self) -> None:
        """Return the connection to the pool if the body is complete and it may be kept."""
        if not self._ended:
            self._ended = True
            # After an event stream the pool holds the connection back for a moment (see
            # ConnectionPool._take_idle): llama.cpp closes right behind the last event.
            stream = self.headers.get(_CONTENT_TYPE, "").startswith("text/event-stream")
            self._conn.checkin(self.complete and self._conn.keep_alive, after_stream=stream)

    def close(self) -> None:
        """Abort now: close the connection (the replica sees its client leave)."""
        if not self._ended:
            self._ended = True
            self._conn.checkin(False)
