"""The floor: a minimal aiohttp passthrough proxy, what any aiohttp proxy costs before features.

No queue, no slots, no metrics: one pooled client session, body in, bytes out. batchgate is
measured against it to show what its features cost (bench/run.py).
Usage: python bench/passthrough.py UPSTREAM_URL PORT
"""

import sys

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM = sys.argv[1]
PORT = int(sys.argv[2])
HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


async def handle(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    body = await request.read()
    async with session.request(request.method, UPSTREAM + request.path_qs, data=body,
                               headers=headers, auto_decompress=False) as upstream:
        response = web.StreamResponse(status=upstream.status)
        for k, v in upstream.headers.items():
            if k.lower() not in HOP:
                response.headers[k] = v
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app["session"].close()


app = web.Application(client_max_size=64 * 1024 * 1024)
app.cleanup_ctx.append(session_ctx)
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=PORT, access_log=None, print=None,
            loop=uvloop.new_event_loop())
