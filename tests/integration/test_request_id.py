"""X-Request-Id: a caller's id is kept only if it is a plain token, else one is generated."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Callable
from typing import Any

import pytest

from proxy.edge.app import LIFECYCLE
from proxy.observe.accesslog import AccessLog
from tests.integration.conftest import BOUND_S, Proxy, make_config
from tests.integration.raw import Caller, Request, raw_replica, response

Factory = Callable[..., Any]
GENERATED = re.compile(r"[0-9a-f]{32}")


async def _ok(_request: Request, w: asyncio.StreamWriter) -> bool:
    w.write(response(200, b"{}", ("Content-Type", "application/json")))
    return True


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"abc-DEF_1.2:3", True),
        (b"x" * 128, True),
        (b"x" * 129, False),
        (b"has space", False),
        (b"a replica=evil", False),
        (b"caf\xc3\xa9", False),
        (b"bad\xffbyte", False),
        (b'quote"d', False),
    ],
    ids=["token", "128", "129", "space", "forged-field", "utf8", "non-utf8", "quote"],
)
async def test_request_id_is_kept_only_if_it_is_a_plain_token(
    proxy: Factory, sent: bytes, kept: bool
) -> None:
    out = io.BytesIO()
    access = AccessLog(out, "text")
    async with raw_replica(_ok) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1)), access)
        caller = await Caller.open(p.url)
        try:
            caller.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                        b"X-Request-Id: " + sent + b"\r\n\r\n{}")
            answer = await asyncio.wait_for(caller.answer(), BOUND_S)
        finally:
            caller.close()
        assert await p.app[LIFECYCLE].wait_idle(BOUND_S)
    access.close()
    assert answer.status == 200
    returned = answer.header("X-Request-Id")
    assert returned is not None
    (seen,) = r.requests
    assert seen.header("X-Request-Id") == returned
    if kept:
        assert returned == sent.decode()
    else:
        assert GENERATED.fullmatch(returned), returned
    (line,) = out.getvalue().decode("ascii").splitlines()
    assert f" request_id={returned} " in line
