"""Request bodies and targets as the replica receives them: byte for byte, origin-form."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from proxy.edge.app import PLAIN_POSTS
from tests.integration.conftest import Proxy, make_config, until
from tests.integration.raw import Caller, Request, raw_replica, response

Factory = Callable[..., Any]
COMPLETIONS = "/v1/completions"


async def _echo(request: Request, w: asyncio.StreamWriter) -> bool:
    # Also a valid (empty) model list, so GET /v1/models is answered through the union.
    body = json.dumps({"object": "list", "data": [], "target": request.target,
                       "sha256": hashlib.sha256(request.body).hexdigest()}).encode()
    w.write(response(200, body, ("Content-Type", "application/json")))
    return True


@pytest.mark.parametrize(
    "body",
    [gzip.compress(json.dumps({"prompt": "x" * 5000}).encode()), b"\x1f\x8bnot gzip at all"],
    ids=["gzip", "invalid-gzip"],
)
async def test_encoded_request_body_reaches_the_replica_byte_for_byte(
    proxy: Factory, body: bytes
) -> None:
    async with raw_replica(_echo) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1)))
        caller = await Caller.open(p.url)
        try:
            answer = await caller.request("POST", COMPLETIONS, body,
                                          ("Content-Type", "application/json"),
                                          ("Content-Encoding", "gzip"))
        finally:
            caller.close()
    assert answer.status == 200, answer  # the replica decides what a bad encoding is worth
    (seen,) = r.requests
    assert seen.body == body
    assert json.loads(answer.body)["sha256"] == hashlib.sha256(body).hexdigest()
    assert seen.header("Content-Encoding") == "gzip"
    assert seen.header("Content-Length") == str(len(body))


@pytest.mark.parametrize(
    ("method", "target", "seen_target", "route"),
    [
        ("GET", "http://user:secret@example.com:8000/v1/models", "/v1/models", "/v1/models"),
        ("POST", "http://user:secret@example.com:8000/v1/completions?x=1",
         "/v1/completions?x=1", "/v1/completions"),
        ("POST", "/a/../v1/./completions?q=%20", "/v1/completions?q=%20", "/v1/completions"),
        ("POST", "/v1/a/%2E%2e/completions", "/v1/completions", "/v1/completions"),
        ("POST", "/v1/completions#frag", "/v1/completions", "/v1/completions"),
        # RFC 9112 3.2.1: an empty path in absolute-form is "/"; asterisk-form stays "*".
        ("GET", "http://user:secret@example.com:8000", "/", "other"),
        ("POST", "http://example.com:8000?x=1", "/?x=1", "other"),
        ("OPTIONS", "*", "*", "other"),
    ],
    ids=["absolute-models", "absolute-post", "dot-segments", "encoded-dots", "fragment",
         "absolute-empty-path", "absolute-empty-path-query", "asterisk"],
)
async def test_replicas_always_get_origin_form(
    proxy: Factory, method: str, target: str, seen_target: str, route: str
) -> None:
    async with raw_replica(_echo) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1)))
        caller = await Caller.open(p.url)
        try:
            answer = await caller.request(method, target, b"{}" if method == "POST" else b"")
        finally:
            caller.close()
    assert answer.status == 200, answer
    (seen,) = r.requests
    assert seen.target == seen_target
    assert not any("secret" in value for _, value in seen.headers)
    assert p.metric("batchgate_requests_total", replica="r", route=route, code="200",
                    tenant="none") == 1


async def test_every_method_on_the_api_paths_is_proxied(proxy: Factory) -> None:
    # POST to these paths has plain routes of its own (proxy.edge.app); every other method
    # still reaches the catch-all: proxied, never a 404 or 405 of aiohttp's.
    async with raw_replica(_echo) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1)))
        caller = await Caller.open(p.url)
        asked = []
        try:
            for path in PLAIN_POSTS:
                for method in ("GET", "PUT", "PATCH", "DELETE", "OPTIONS", "POST"):
                    answer = await caller.request(method, path, b"{}")
                    assert answer.status == 200, (method, path, answer)
                    asked.append((method, path))
        finally:
            caller.close()
    assert [(seen.method, seen.target) for seen in r.requests] == asked


async def test_models_behind_dot_segments_is_routed_as_models_without_a_slot(
    proxy: Factory,
) -> None:
    release = asyncio.Event()

    async def script(request: Request, w: asyncio.StreamWriter) -> bool:
        if request.method == "POST":
            await release.wait()  # holds the only slot
        w.write(response(200, b'{"object": "list", "data": []}',
                         ("Content-Type", "application/json")))
        return True

    async with raw_replica(script) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1), max_queue=0))
        holder = await Caller.open(p.url)
        caller = await Caller.open(p.url)
        try:
            held = asyncio.create_task(holder.request("POST", COMPLETIONS, b"{}"))
            await until(lambda: p.scheduler.replicas[0].in_flight == 1, "the only slot is held")
            answer = await caller.request("GET", "/x/../v1/models")
            release.set()
            assert (await held).status == 200
        finally:
            release.set()
            holder.close()
            caller.close()
    assert answer.status == 200, answer
    assert [req.target for req in r.requests if req.method == "GET"] == ["/v1/models"]

