"""The byte-for-byte passthrough of a replica's answer to the caller.

Bodies pass through untouched: the request body is sent as received, the response body is
written to the caller chunk by chunk as it arrives (SSE events are never held back or merged
by us), with ``auto_decompress=False`` so a ``Content-Encoding`` stays intact. When the caller
goes away, the upstream connection is closed, not returned to the pool: vLLM and TGI abort a
generation when their client disconnects, and a GPU must not generate for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.edge.headers import downstream_response_headers
from proxy.observe.exchange import Exchange
from proxy.observe.usage import UsageTail
from proxy.upstream.connection import Response, UpstreamClosedError, UpstreamTimeoutError


class _CoalescingResponse(web.StreamResponse):
    """Sends its headers together with the first body chunk: one write instead of two.

    Only for answers that are not event streams: a stream's headers go out at once, so its
    caller knows it was accepted before the first token.
    """

    # aiohttp's own web.Response does the same; StreamResponse flushes headers in prepare().
    _send_headers_immediately = False


#: A write that may fill the caller's socket buffer (the transport pauses at 64 KiB and the
#: write then waits for the caller) is bounded by the stall limit; smaller ones never wait.
_STALL_CHECK_BYTES = 16 * 1024


def sse_error_event(message: str, type_: str, code: str) -> bytes:
    """A last SSE event that OpenAI SDKs raise as an APIError instead of ending silently."""
    payload = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"


def is_event_stream(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> bool:
    return headers.get("Content-Type", "").startswith("text/event-stream")


async def pipe(
    request: web.BaseRequest,
    upstream: Response,
    exchange: Exchange,
    *,
    is_cut: Callable[[], bool],
    on_gap: Callable[[float], None],
    stall_limit_s: float,
) -> web.StreamResponse:
    """Relay status, headers and body as they arrive; the caller closes ``upstream``.

    Each chunk is written to the caller first; only then is it looked at (the usage tail,
    the gap since the previous chunk of an event stream), so observation never delays bytes.
    Returns normally when the caller hung up mid-body (``exchange.client_gone``) or the
    replica failed mid-body (``exchange.upstream_error``): headers are sent by then, so
    there is no error status left to give, only a connection to close.
    """
    sse = is_event_stream(upstream.headers)
    response_class = web.StreamResponse if sse else _CoalescingResponse
    response = response_class(status=upstream.status, reason=upstream.reason)
    response.headers.extend(downstream_response_headers(upstream.headers, exchange.request_id))
    tail = exchange.usage = UsageTail()
    clock = time.monotonic
    try:
        await response.prepare(request)
        exchange.prepared = True
        while True:
            try:
                chunk = await upstream.readany()
            except UpstreamTimeoutError as err:
                return await _upstream_failed(request, response, exchange, sse, "timeout", err)
            except (UpstreamClosedError, OSError) as err:
                return await _upstream_failed(request, response, exchange, sse, "reset", err)
            if not chunk:
                break
            now = clock()  # when it arrived, not when the caller took it
            transport = request.transport
            if transport is not None and (
                transport.get_write_buffer_size() + len(chunk) > _STALL_CHECK_BYTES
            ):
                # The caller's socket is full. A caller that stays connected but stops
                # reading would hold its slot (and the engine) forever: bound the wait.
                try:
                    async with asyncio.timeout(stall_limit_s):
                        await response.write(chunk)
                except TimeoutError:
                    exchange.client_gone = True
                    transport.close()
                    return response
            else:
                await response.write(chunk)
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
        if is_cut() and sse and exchange.prepared:
            # Shutdown's deadline passed mid-stream: say so in the stream's own protocol.
            await _end_stream_with_error(
                response,
                sse_error_event("batchgate is shutting down; stream cut at the drain deadline",
                                "service_unavailable", "draining"),
            )
        raise
    return response


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
