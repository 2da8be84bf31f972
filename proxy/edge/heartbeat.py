"""Honest waiting for streams: ``queue.sse_heartbeat_s``.

A streaming request (``"stream": true``) that has to wait for a slot gets its ``200`` and
``text/event-stream`` headers the moment it joins the queue, then an SSE comment
``: queued position=N`` every ``sse_heartbeat_s`` while it waits: an ingress or a client with an
idle timeout sees bytes, and SSE clients (the ``openai`` SDK, a ``requests`` loop over
``iter_lines``) skip comments. Once it has its slot, the replica's event stream is relayed into
the open response byte for byte (:func:`proxy.edge.relay.pipe` with ``opened``).

What cannot be said in headers any more is said in the stream's own protocol, as the relay
does for a stream cut short (:func:`proxy.edge.relay.sse_error_event`): a rejection while
waiting (``queue_timeout``, ``no_healthy_replica``, an eviction, the drain deadline...) and a
replica that answers anything but ``200`` and an event stream end the stream with one
``event: error`` whose ``data:`` is the OpenAI-style error object, then the chunked terminator.
The exchange still records the truth: its outcome (``rejected:queue_timeout``, so
``batchgate_rejected_requests_total{reason}`` counts it as any rejection), with ``status`` 200,
the status that was sent; when a replica answered, its own status (what ``requests_total`` and
outlier ejection go by).

Only requests that actually queue pay for any of this: a free slot is taken at once, without a
task or a header sent early. Each heartbeat asks the queue for the waiter's position, which
walks the queue (O(waiters)): at ``sse_heartbeat_s`` of a few seconds, the usual ingress idle
timeouts being 60 s or more, that is far below the cost of the requests themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable

from aiohttp import HttpVersion11, web

from proxy.core.errors import Draining, ProxyError
from proxy.core.queue import Waiter
from proxy.core.scheduler import Scheduler
from proxy.edge.frame import end_with
from proxy.edge.relay import is_event_stream, sse_error_event
from proxy.observe.exchange import Exchange
from proxy.upstream.connection import Response

#: A refusing replica's body is read up to this for its error object; the rest is not needed.
ERROR_BODY_LIMIT = 64 * 1024


def comment(position: int) -> bytes:
    """One heartbeat: an SSE comment (a line starting with ``:``), which clients ignore."""
    return b": queued position=%d\n\n" % position


def replica_error(status: int, body: bytes, replica: str | None) -> bytes:
    """The ``event: error`` for a replica's answer that is not a ``200`` event stream.

    The replica's own error object is kept when it sent one: OpenAI's and current vLLM's
    ``{"error": {...}}``, or older vLLM's flat ``{"object": "error", "message": ...}``; its
    ``message``, ``type`` and ``code`` are kept (missing ones filled in). Anything else becomes
    ``upstream_error`` with code ``upstream_status_<status>`` and the start of the body.
    """
    doc: object = None
    with contextlib.suppress(ValueError, RecursionError):
        doc = json.loads(body)
    fields: dict[str, object] = {}
    if isinstance(doc, dict):
        inner = doc.get("error")
        if isinstance(inner, dict):
            fields = inner
        elif isinstance(doc.get("message"), str):
            fields = doc
    message = fields.get("message")
    if not isinstance(message, str):
        text = body[:200].decode("utf-8", "replace").strip()
        message = f"replica {replica} answered {status}" + (f": {text}" if text else "")
    type_ = fields.get("type")
    code = fields.get("code")
    return sse_error_event(
        message,
        type_ if isinstance(type_, str) else "upstream_error",
        str(code) if isinstance(code, str | int) and not isinstance(code, bool)
        else f"upstream_status_{status}",
    )


class Heartbeat:
    """One streaming request's wait: early headers, comments while queued, errors as events.

    ``queued`` is the scheduler's ``on_queued`` hook (synchronous); it starts the task that
    sends the headers and the comments. The forward loop calls :meth:`granted` once it holds a
    slot (the task stops, and no write of its own is under way when the relay starts writing),
    and runs inside :meth:`guard`, which turns a rejection after the headers into the error
    event. ``response`` is set from the moment the headers are being sent: from then on the
    answer is this stream, whatever happens.
    """

    __slots__ = ("_cutting", "_draining", "_exchange", "_interval_s", "_owner", "_request",
                 "_scheduler", "_stop", "_task", "_waiter", "response")

    def __init__(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        scheduler: Scheduler,
        interval_s: float,
        *,
        draining: Callable[[], bool],
        cutting: Callable[[], bool],
    ) -> None:
        self._request = request
        self._exchange = exchange
        self._scheduler = scheduler
        self._interval_s = interval_s
        self._draining = draining
        self._cutting = cutting
        self._owner = asyncio.current_task()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._waiter: Waiter | None = None
        self.response: web.StreamResponse | None = None

    def queued(self, waiter: Waiter) -> None:
        """The request joined the queue (again, after a resend): beat until :meth:`granted`."""
        self._waiter = waiter
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def granted(self) -> None:
        """It has a slot: stop beating, after any write in progress (never cut one short)."""
        task, self._task = self._task, None
        if task is None:
            return
        if self.response is None:
            # Granted before the task first ran: nothing was sent, so nothing is: the answer
            # is relayed as if it had never waited (its own status and headers).
            task.cancel()
            return
        self._stop.set()
        with contextlib.suppress(ConnectionError):
            await task

    def takes(self, upstream: Response) -> bool:
        """Whether ``upstream`` can be relayed into the open stream: a 200 event stream."""
        return upstream.status == 200 and is_event_stream(upstream.headers)

    async def refused(self, upstream: Response) -> web.StreamResponse:
        """The replica answered something else: end the open stream with its error."""
        assert self.response is not None
        parts: list[bytes] = []
        read = 0
        with contextlib.suppress(ConnectionError, OSError, ProxyError):
            while read < ERROR_BODY_LIMIT:
                # At least once: a small body may have come in whole with the head.
                chunk = await upstream.readany()
                if not chunk:
                    break
                parts.append(chunk)
                read += len(chunk)
                if upstream.complete:
                    break
        if upstream.complete:
            self._exchange.stage = "done"  # read to its end: the connection can be reused
        await self._end(replica_error(upstream.status, b"".join(parts), self._exchange.replica))
        return self.response

    async def guard(self, work: Awaitable[web.StreamResponse]) -> web.StreamResponse:
        """Run the forward loop; once the headers are out, its errors end the stream."""
        exchange = self._exchange
        try:
            return await work
        except ProxyError as err:
            await self.granted()
            if self.response is None:
                raise  # never opened: the frame answers with the error's own status
            end_with(exchange, err)
            exchange.status = 200
            await self._end(sse_error_event(err.message, err.type, err.code))
            return self.response
        except asyncio.CancelledError:
            self._cancel()
            if self.response is None or exchange.stage != "queued" or not self._cutting():
                raise  # the caller left (its waiter is withdrawn), or the relay said it
            # Cut at the drain deadline while it waited: the frame's 503 draining, as an event.
            cut = Draining("batchgate is shutting down; request cut at the drain deadline")
            end_with(exchange, cut)
            exchange.status = 200
            self.response.force_close()
            await self._end(sse_error_event(cut.message, cut.type, cut.code))
            return self.response
        finally:
            self._cancel()

    # -- internals -----------------------------------------------------------------------

    def _cancel(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def _beat(self) -> None:
        exchange = self._exchange
        try:
            if self.response is None:
                self.response = response = web.StreamResponse(headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    # nginx (and ingress-nginx) would buffer the comments, defeating them.
                    "X-Accel-Buffering": "no",
                    "X-Request-Id": exchange.request_id,
                })
                if self._request.version >= HttpVersion11:
                    response.enable_chunked_encoding()  # so an error event can end it cleanly
                if self._draining():
                    response.force_close()
                await response.prepare(self._request)
                exchange.prepared = True
            while True:
                try:
                    async with asyncio.timeout(self._interval_s):
                        await self._stop.wait()
                    return
                except TimeoutError:
                    pass
                waiter = self._waiter
                position = self._scheduler.position(waiter) if waiter is not None else None
                if position is None:
                    return  # granted or expired this instant: the forward loop takes over
                beat = comment(position)
                await self.response.write(beat)
                exchange.bytes_out += len(beat)
        except ConnectionError:
            # The caller is gone: stop waiting for it (its waiter leaves the queue at once).
            exchange.client_gone = True
            if self._owner is not None:
                self._owner.cancel()

    async def _end(self, event: bytes) -> None:
        assert self.response is not None
        with contextlib.suppress(ConnectionError):
            await self.response.write(event)
            self._exchange.bytes_out += len(event)
            await self.response.write_eof()
