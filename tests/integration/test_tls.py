"""TLS to replicas: verified by default, ``upstream.tls.ca_file``, ``insecure_skip_verify``, SNI.

The CA is made in the test (``trustme``); the replica is the conftest's fake engine behind an
aiohttp TLS listener on 127.0.0.1 whose certificate names "localhost" and "127.0.0.1".
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.config import Config, TlsConfig
from tests.integration.conftest import FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]


@dataclasses.dataclass
class TlsReplica:
    replica: FakeReplica
    port: int
    ca_file: Path
    server_names: list[str | None]


@pytest.fixture
async def tls_replica(tmp_path: Path) -> AsyncIterator[TlsReplica]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    names: list[str | None] = []

    def sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(name)

    server_ctx.sni_callback = sni  # type: ignore[assignment]
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    replica = FakeReplica("tls")
    runner = web.AppRunner(replica.app(), handler_cancellation=True, access_log=None,
                           shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
    replica.runner = runner
    port = runner.addresses[0][1]
    yield TlsReplica(replica, port, ca_file, names)
    replica.gate.set()
    await runner.cleanup()


def tls_config(url: str, tls: TlsConfig, **kwargs: Any) -> Config:
    config = make_config(("tls", url, 2), **kwargs)
    return dataclasses.replace(config, upstream=dataclasses.replace(config.upstream, tls=tls))


async def test_verified_with_ca_file_and_sni_from_the_url_host(
    tls_replica: TlsReplica, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r = tls_replica.replica
    url = f"https://localhost:{tls_replica.port}"
    p: Proxy = await proxy(tls_config(url, TlsConfig(ca_file=str(tls_replica.ca_file)),
                                      health_interval_s=0.05))
    await until(lambda: r.health_hits >= 2, "health probes pass over TLS")
    assert p.scheduler.replicas[0].healthy
    async with client.post(p.url + "/v1/completions", json={"x": 1}) as resp:
        assert resp.status == 200
        assert (await resp.json())["replica"] == "tls"
    async with client.post(p.url + "/v1/completions", json={"stream": True}) as resp:
        assert resp.status == 200
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    async with client.get(p.url + "/v1/models") as resp:  # the slot-free pool speaks TLS too
        assert resp.status == 200
        assert (await resp.json())["data"] == [{"id": "tls"}]
    assert r.seen_headers[0]["Host"] == f"localhost:{tls_replica.port}"
    assert tls_replica.server_names and set(tls_replica.server_names) == {"localhost"}


async def test_unknown_ca_is_refused_with_502_not_a_traceback(
    tls_replica: TlsReplica, proxy: Factory, client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = tls_replica.replica
    # The system CAs do not know the test's CA.
    p: Proxy = await proxy(tls_config(f"https://127.0.0.1:{tls_replica.port}", TlsConfig(),
                                      retries=0, health={"unhealthy_after": 1}))
    replica = p.scheduler.replicas[0]
    # Health probes use the same TLS settings: the first one marks the replica down
    # (unhealthy_after: 1, so the one probe of the 60 s interval is enough).
    await until(lambda: not replica.healthy, "the probe fails verification")
    # A request that got there before the probe did (healthy again, as at startup):
    p.scheduler.set_healthy(replica, True)
    with caplog.at_level(logging.ERROR, logger="batchgate"):
        async with client.post(p.url + "/v1/completions", json={"x": 1}) as resp:
            assert resp.status == 502
            body = await resp.json()
    assert body["error"]["code"] == "upstream_connect"
    assert "certificate verify failed" in body["error"]["message"]
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert r.arrivals == 0
    assert p.metric("batchgate_upstream_errors_total", replica="tls", kind="connect") == 1


async def test_insecure_skip_verify_accepts_any_certificate(
    tls_replica: TlsReplica, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r = tls_replica.replica
    p: Proxy = await proxy(tls_config(f"https://127.0.0.1:{tls_replica.port}",
                                      TlsConfig(insecure_skip_verify=True),
                                      health_interval_s=0.05))
    await until(lambda: r.health_hits >= 2, "health probes pass without verification")
    assert p.scheduler.replicas[0].healthy
    async with client.post(p.url + "/v1/completions", json={"x": 1}) as resp:
        assert resp.status == 200
        assert (await resp.json())["replica"] == "tls"
