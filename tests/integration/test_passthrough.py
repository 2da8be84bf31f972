"""Request bodies and targets as the replica receives them: byte for byte, origin-form."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.conftest import Proxy, make_config
from tests.integration.raw import Caller, Request, raw_replica, response

Factory = Callable[..., Any]
COMPLETIONS = "/v1/completions"


async def _echo(request: Request, w: asyncio.StreamWriter) -> bool:
    body = json.dumps({"target": request.target,
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
