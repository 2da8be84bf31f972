"""Observers (usage, metrics, access log) can never cost a request, drain, or each other."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy.control.health import HealthChecker
from proxy.edge.app import LIFECYCLE
from proxy.observe.accesslog import AccessLog
from proxy.observe.metrics import INTERNAL_ERROR_SITES, Metrics
from proxy.observe.usage import UsageTail
from tests.integration.conftest import BOUND_S, FakeReplica, Proxy, make_config
from tests.integration.raw import Request, raw_replica, response

Factory = Callable[..., Any]
COMPLETIONS = "/v1/completions"

#: A `usage` nested ~1,000 deep: json's decoder raises RecursionError on it.
DEEP_BODY = b'{"id": "x", "usage": ' + b"[" * 1000 + b"]" * 1000 + b"}"


def log_lines(out: io.BytesIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().decode().splitlines()]


async def test_deep_usage_breaks_neither_drain_nor_the_access_log(
    proxy: Factory, client: aiohttp.ClientSession
) -> None:
    async def deep(_request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(200, DEEP_BODY, ("Content-Type", "application/json")))
        return True

    out = io.BytesIO()
    access = AccessLog(out, "json")
    async with raw_replica(deep) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1)), access)
        async with client.post(p.url + COMPLETIONS, json={},
                               headers={"X-Request-Id": "deep"}) as answer:
            assert answer.status == 200
            assert await answer.read() == DEEP_BODY
        # What SIGTERM does: wait for the requests being served. Nothing is.
        assert await p.app[LIFECYCLE].wait_idle(BOUND_S), "drain waits for a finished request"
        assert p.app[LIFECYCLE].active == 0
    access.close()
    (line,) = log_lines(out)
    assert line["request_id"] == "deep" and line["status"] == 200 and line["outcome"] == "ok"
    assert line["prompt_tokens"] is None
    assert p.metric("batchgate_requests_total", replica="r", route=COMPLETIONS, code="200",
                    tenant="none") == 1
    assert p.metric("batchgate_request_duration_seconds_count", route=COMPLETIONS) == 1


def test_internal_errors_exported_at_zero_from_startup() -> None:
    metrics = Metrics()
    for where in INTERNAL_ERROR_SITES:
        value = metrics.registry.get_sample_value("batchgate_internal_errors_total",
                                                  {"where": where})
        assert value == 0, where
    assert set(INTERNAL_ERROR_SITES) == {"usage", "metrics", "access_log", "health",
                                        "discovery", "adaptive"}


def _boom(*_args: object) -> None:
    raise RuntimeError("observer bug")


@pytest.mark.parametrize("where", ["usage", "metrics", "access_log", "health"])
async def test_one_failing_observer_skips_no_other(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str,
) -> None:
    r: FakeReplica = await replicas("r")
    out = io.BytesIO()
    access = AccessLog(out, "json")
    p: Proxy = await proxy(make_config(("r", r.url, 1)), access)
    target = {"usage": (UsageTail, "usage"), "metrics": (Metrics, "record"),
              "access_log": (AccessLog, "record"), "health": (HealthChecker, "observe")}[where]
    monkeypatch.setattr(*target, _boom)
    async with client.post(p.url + COMPLETIONS, json={},
                           headers={"X-Request-Id": "rid"}) as answer:
        assert answer.status == 200
        await answer.read()
    assert await p.app[LIFECYCLE].wait_idle(BOUND_S)
    monkeypatch.undo()
    access.close()

    assert p.metric("batchgate_internal_errors_total", where=where) == 1
    for other in {"usage", "metrics", "access_log", "health"} - {where}:
        assert p.metric("batchgate_internal_errors_total", where=other) == 0
    assert any(where in rec.getMessage() and rec.exc_info for rec in caplog.records)
    lines = log_lines(out)
    if where == "access_log":
        assert lines == []
    else:
        (line,) = lines
        assert line["request_id"] == "rid" and line["outcome"] == "ok"
        expected_tokens = None if where == "usage" else 3
        assert line["prompt_tokens"] == expected_tokens
    if where != "metrics":
        assert p.metric("batchgate_request_duration_seconds_count", route=COMPLETIONS) == 1
        tokens = p.metric("batchgate_tokens_total", replica="r", kind="prompt")
        assert tokens == (0 if where == "usage" else 3)


async def test_access_log_drops_are_exported(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    out = io.BytesIO()
    access = AccessLog(out, "json", max_pending=0)  # a log that can hold nothing: all drop
    p: Proxy = await proxy(make_config(("r", r.url, 1)), access)
    assert p.metric("batchgate_access_log_dropped_total") == 0
    for _ in range(2):
        async with client.post(p.url + COMPLETIONS, json={}) as answer:
            assert answer.status == 200
    assert await p.app[LIFECYCLE].wait_idle(BOUND_S)
    access.close()
    assert p.metric("batchgate_access_log_dropped_total") == 2
    assert out.getvalue() == b""
