"""The byte-for-byte passthrough of a replica's answer to the caller.

The response body is written to the caller chunk by chunk as it arrives (SSE events are
never held back or merged by us) and never decoded: batchgate's own upstream client does no
decompression, so a ``Content-Encoding`` stays intact. When the caller goes away, the upstream
connection is closed, not returned to the pool: vLLM and TGI abort a generation when their
client disconnects, and a GPU must not generate for nobody.

Only public aiohttp API here: headers and a whole body go out in one write through
``web.Response``; a streamed body through ``web.StreamResponse``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

from aiohttp import HttpVersion11, web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.control.drain import Lifecycle
from proxy.core.errors import UpstreamError, UpstreamTimeout
from proxy.edge.headers import downstream_response_headers
from proxy.observe.exchange import Exchange
from proxy.observe.usage import UsageTail
from proxy.upstream.connection import Response

#: A write that may fill the caller's socket buffer (the transport pauses at 64 KiB and the
#: write then waits for the caller) is bounded by the stall limit; smaller ones never wait.
_STALL_CHECK_BYTES = 16 * 1024

# Folded once (istr): a plain str name is folded again on every lookup.
_CONTENT_TYPE, _CONTENT_LENGTH, _TRANSFER_ENCODING = (
    istr("Content-Type"), istr("Content-Length"), istr("Transfer-Encoding"))


def sse_error_event(message: str, type_: str, code: str) -> bytes:
    """A last SSE event that OpenAI SDKs raise as an APIError instead of ending silently."""
    payload = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"


def is_event_stream(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> bool:
    return headers.get(_CONTENT_TYPE, "").startswith("text/event-stream")


async def pipe(
    request: web.BaseRequest,
    upstream: Response,
    exchange: Exchange,
    *,
    lifecycle: Lifecycle,
    on_gap: Callable[[float], None],
    stall_limit_s: float,
    opened: web.StreamResponse | None = None,
) -> web.StreamResponse:
    """Relay status, headers and body as they arrive; the caller closes ``upstream``.

    ``opened``: a 200 event stream whose headers went out while the request waited
    (:mod:`proxy.edge.heartbeat`); ``upstream`` (a 200 event stream too) is relayed into it,
    its status and headers unsent.

    An event stream's headers go out at once (its caller knows it was accepted before the
    first token) and it is always re-framed chunked, so a cut stream can end with an error
    event inside a properly ended body. Any other answer commits nothing before its first
    body bytes (or its end): a replica failing before then raises :class:`UpstreamError`
    (502, or :class:`UpstreamTimeout` 504), which the frame answers like any other error.

    While draining (``lifecycle.draining``), a head that goes out says ``Connection: close``, and
    the caller's connection is closed after this answer.

    Each chunk is written to the caller first; only then is it looked at (the usage tail,
    the gap since the previous chunk of an event stream), so observation never delays bytes.
    Returns normally when the caller hung up mid-body (``exchange.client_gone``) or the
    replica failed mid-body (``exchange.upstream_error``): headers are sent by then, so
    there is no error status left to give, only a connection to close.
    """
    sse = is_event_stream(upstream.headers)
    headers = downstream_response_headers(upstream.headers, exchange.request_id,
                                          exchange.queue_ms)
    tail = exchange.usage = UsageTail()
    clock = time.monotonic
    chunk = b""
    response: web.StreamResponse
    if opened is not None:
        response = opened
    elif sse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=headers)
        # Re-framed chunked whatever the replica used: a declared length could not take the
        # error event of a cut stream, and the caller's connection would fall out of sync.
        # (An HTTP/1.0 caller gets a close-delimited body instead: aiohttp's default.)
        response.headers.popall("Content-Length", None)
        if request.version >= HttpVersion11:
            response.enable_chunked_encoding()
    else:
        try:
            chunk = await upstream.readany()
            first_at = clock()
            if not upstream.complete and _held_whole(upstream):
                # A declared length small enough to hold: wait for all of it, so a replica
                # that dies short of it is a 502, not a 200 with a cut body. Nothing is lost
                # by waiting: a caller cannot use half a JSON answer.
                parts = [chunk]
                while not upstream.complete:
                    more = await upstream.readany()
                    if not more:
                        break
                    parts.append(more)
                chunk = b"".join(parts)
        except UpstreamTimeout as err:
            raise UpstreamTimeout(_before_body(exchange, "timeout", err),
                                  replica=exchange.replica) from err
        except (UpstreamError, OSError) as err:
            kind = err.kind if isinstance(err, UpstreamError) else "reset"
            raise UpstreamError(_before_body(exchange, kind, err), kind=kind,
                                replica=exchange.replica) from err
        if upstream.complete:
            # The whole body in hand (most JSON answers): headers and body in one write.
            response = web.Response(status=upstream.status, reason=upstream.reason,
                                    headers=headers, body=chunk)
        else:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                          headers=headers)
    try:
        if lifecycle.draining:
            response.force_close()
        if opened is None:
            await response.prepare(request)
            exchange.prepared = True
        if not sse:
            if chunk:
                exchange.first_byte_at = first_at
                exchange.last_byte_at = clock()
                exchange.stage = "streaming"
            transport = _filling(request, chunk)
            if transport is not None:
                if not await _write_bounded(transport, response, chunk, exchange,
                                            stall_limit_s):
                    return response
            elif isinstance(response, web.Response):
                await response.write_eof()  # headers and the whole body: one write
                exchange.bytes_out += len(chunk)
            else:
                await response.write(chunk)
                exchange.bytes_out += len(chunk)
            tail.feed(chunk)
            if isinstance(response, web.Response):  # ended by that write: the body was whole
                exchange.stage = "done"
                return response
        while True:
            try:
                chunk = await upstream.readany()
            except UpstreamTimeout as err:
                return await _upstream_failed(request, response, exchange, sse, "timeout", err)
            except (UpstreamError, OSError) as err:
                kind = err.kind if isinstance(err, UpstreamError) else "reset"
                return await _upstream_failed(request, response, exchange, sse, kind, err)
            if not chunk:
                break
            now = clock()  # when it arrived, not when the caller took it
            # No coroutine per chunk: only a write that may fill the caller's
            # socket takes the bounded path.
            transport = _filling(request, chunk)
            if transport is not None:
                if not await _write_bounded(transport, response, chunk, exchange,
                                            stall_limit_s):
                    return response
            else:
                await response.write(chunk)
                exchange.bytes_out += len(chunk)
            if exchange.last_byte_at is None:
                exchange.first_byte_at = now
                exchange.stage = "streaming"
            elif sse:
                on_gap(now - exchange.last_byte_at)
            exchange.last_byte_at = now
            tail.feed(chunk)
        exchange.stage = "done"
        await response.write_eof()
    except ConnectionResetError:
        exchange.client_gone = True
    except asyncio.CancelledError:
        if sse and exchange.prepared and exchange.cut_reason is not None:
            # The replica is wedged (proxy.control.stall): its stream ends, and says why.
            await _end_stream_with_error(
                response, sse_error_event(exchange.cut_reason, "upstream_error",
                                          "upstream_timeout"),
            )
        elif lifecycle.cutting and sse and exchange.prepared:
            # Shutdown's deadline passed mid-stream: say so in the stream's own protocol.
            await _end_stream_with_error(
                response,
                sse_error_event("batchgate is shutting down; stream cut at the drain deadline",
                                "service_unavailable", "draining"),
            )
        raise
    return response


#: A body that is not an event stream and declares at most this length is sent to the caller
#: only once it is all in: a replica that fails short of it gets the caller a 502.
HOLD_WHOLE_BYTES = 1024 * 1024


def _held_whole(upstream: Response) -> bool:
    length = upstream.headers.get(_CONTENT_LENGTH)
    if length is None or _TRANSFER_ENCODING in upstream.headers:
        return False
    return length.isdigit() and int(length) <= HOLD_WHOLE_BYTES


def _before_body(exchange: Exchange, kind: str, err: BaseException) -> str:
    return f"replica {exchange.replica} failed before its first body byte ({kind}): {err}"


def _filling(request: web.BaseRequest, chunk: bytes) -> asyncio.Transport | None:
    """The caller's transport if writing ``chunk`` may fill its socket buffer (the write then
    takes the bounded path), else None: a plain call, no coroutine per chunk."""
    transport = request.transport
    if transport is not None and (
            transport.get_write_buffer_size() + len(chunk) > _STALL_CHECK_BYTES):
        return transport
    return None


async def _write_bounded(
    transport: asyncio.BaseTransport,
    response: web.StreamResponse,
    chunk: bytes,
    exchange: Exchange,
    stall_limit_s: float,
) -> bool:
    """Write ``chunk`` (a :class:`web.Response` is ended: ``chunk`` is its body) when it may
    fill the caller's socket; False if the caller stalled.

    A caller that stays connected but stops reading would hold its slot (and the engine)
    forever: a write that may fill its socket is bounded by the stall limit
    (``server.send_timeout_s``, like nginx's ``send_timeout``: counted once the kernel's
    socket buffers are full, not from the caller's last read), and then its connection is
    closed, so what it got never looks complete; the caller of :func:`pipe` closes the
    upstream connection, which makes the engine abort the generation. Smaller writes never
    wait, and :func:`pipe` makes them itself.
    """
    try:
        async with asyncio.timeout(stall_limit_s):
            if isinstance(response, web.Response):
                await response.write_eof()
            else:
                await response.write(chunk)
    except TimeoutError:
        exchange.client_gone = True
        transport.close()
        return False
    exchange.bytes_out += len(chunk)
    return True


async def _upstream_failed(
    request: web.BaseRequest,
    response: web.StreamResponse,
    exchange: Exchange,
    sse: bool,
    kind: str,
    err: BaseException,
) -> web.StreamResponse:
    exchange.upstream_error = kind
    if sse:
        # An event stream can say what happened in its own protocol, then end cleanly: the
        # error event is explicit, so nobody mistakes the stream for complete.
        message = f"replica {exchange.replica} failed mid-stream ({kind}): {err}"
        await _end_stream_with_error(
            response, sse_error_event(message, "upstream_error", f"upstream_{kind}")
        )
    elif request.transport is not None:
        # Any other body: headers are gone, so cutting the connection is the only way to
        # make the truncation visible (an incomplete Content-Length or chunked body).
        request.transport.close()
    return response


async def _end_stream_with_error(response: web.StreamResponse, event: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        await response.write(event)
        await response.write_eof()
