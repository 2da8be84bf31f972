"""The auth suite: missing, wrong and rotated keys against a running proxy; tenants in metrics
and the access log; upstream credentials; and no key anywhere it could leak."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from proxy.config import ApiKey, AuthConfig, Config, ReplicaConfig
from proxy.edge.auth import AUTH, KeyRing, denied, require_key
from proxy.edge.keys import METRICS, RELOADER
from proxy.observe.accesslog import AccessLog
from proxy.observe.metrics import Metrics
from tests.integration.conftest import BOUND_S, FakeReplica, Proxy, make_config, start_app, until

Factory = Callable[..., Any]
COMPLETIONS = "/v1/completions"
KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-fedcba9876543210"
#: Near misses: a wrong key must be refused however much of a real one it holds.
WRONG = [KEY_A[:-1], KEY_A + "x", KEY_A[:-1] + "0", KEY_A.upper(), "Bearer", "x"]


def with_auth(config: Config, auth: AuthConfig, **replica_keys: str) -> Config:
    replicas = tuple(dataclasses.replace(r, api_key=replica_keys.get(r.name))
                     for r in config.replicas)
    return dataclasses.replace(config, auth=auth, replicas=replicas)


TWO_TENANTS = AuthConfig(api_keys=(ApiKey("team-a", KEY_A), ApiKey("team-b", KEY_B)))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def log_lines(out: io.BytesIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().decode().splitlines()]


async def test_without_auth_the_callers_authorization_goes_to_the_replica(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    """As before auth existed: no key needed, the caller's own credential is the replica's."""
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))
    async with client.post(p.url + COMPLETIONS, json={},
                           headers={**bearer("engine-key"), "x-api-key": "x"}) as answer:
        assert answer.status == 200
    assert r.seen_headers[0]["Authorization"] == "Bearer engine-key"
    assert r.seen_headers[0]["x-api-key"] == "x"
    assert p.metric("batchgate_requests_total", replica="r", route=COMPLETIONS, code="200",
                    tenant="none") == 1


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", COMPLETIONS), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
     ("GET", "/version"), ("HEAD", "/v1/models"), ("OPTIONS", "/v1/completions"),
     ("GET", "/a/../v1/models")],
)
async def test_missing_and_wrong_keys_get_401_and_reach_no_replica(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession, method: str, path: str
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(with_auth(make_config(("r", r.url, 1)), TWO_TENANTS))
    cases: list[dict[str, str]] = [{}, {"Authorization": f"Basic {KEY_A}"}]
    cases += [bearer(w) for w in WRONG] + [{"x-api-key": w} for w in WRONG]
    for headers in cases:
        async with client.request(method, p.url + path, data=b"{}",
                                  headers={**headers, "X-Request-Id": "rid-1"}) as answer:
            assert answer.status == 401, headers
            assert answer.headers["WWW-Authenticate"] == "Bearer"
            assert answer.headers["X-Request-Id"] == "rid-1"
            if method != "HEAD":
                body = await answer.json()
                error = body["error"]
                assert (error["type"], error["code"]) == ("invalid_request_error",
                                                          "invalid_api_key")
                text = json.dumps(body)
                assert all(k not in text for k in [KEY_A, KEY_B, *WRONG] if len(k) > 8)
    assert r.arrivals == 0
    assert p.metric("batchgate_rejected_requests_total", reason="unauthorized") == len(cases)


async def test_each_tenants_key_works_by_bearer_or_x_api_key_and_is_never_forwarded(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    out = io.BytesIO()
    access = AccessLog(out, "json")
    p: Proxy = await proxy(with_auth(make_config(("r", r.url, 1)), TWO_TENANTS), access)
    for headers in (bearer(KEY_A), {"x-api-key": KEY_A}, {"authorization": f"bearer {KEY_B}"},
                    {"Authorization": f"Bearer {KEY_B}", "x-api-key": "ignored"}):
        async with client.post(p.url + COMPLETIONS, json={}, headers=headers) as answer:
            assert answer.status == 200, headers
            await answer.read()
    async with client.get(p.url + "/v1/models", headers=bearer(KEY_A)) as answer:
        assert answer.status == 200
    access.close()
    for seen in r.seen_headers:
        assert not {"authorization", "x-api-key"} & {k.lower() for k in seen}, seen
    m = p.metric
    assert m("batchgate_requests_total", replica="r", route=COMPLETIONS, code="200",
             tenant="team-a") == 2
    assert m("batchgate_requests_total", replica="r", route=COMPLETIONS, code="200",
             tenant="team-b") == 2
    assert m("batchgate_requests_total", replica="r", route="/v1/models", code="200",
             tenant="team-a") == 1
    assert [line["tenant"] for line in log_lines(out)] == ["team-a"] * 2 + ["team-b"] * 2 + [
        "team-a"]


async def test_upstream_keys_replace_the_callers_per_replica(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    auth = dataclasses.replace(TWO_TENANTS, upstream_api_key="up-all")
    p: Proxy = await proxy(with_auth(make_config(("a", a.url, 1), ("b", b.url, 1)), auth,
                                     b="up-b"))
    for _ in range(4):
        async with client.post(p.url + COMPLETIONS, json={},
                               headers={**bearer(KEY_A), "x-api-key": KEY_A}) as answer:
            assert answer.status == 200
    async with client.get(p.url + "/v1/models", headers=bearer(KEY_A)) as answer:
        assert answer.status == 200
    assert a.seen_headers and b.seen_headers
    for replica, key in ((a, "up-all"), (b, "up-b")):
        for seen in replica.seen_headers:
            assert seen["Authorization"] == f"Bearer {key}"
            assert "x-api-key" not in {k.lower() for k in seen}


async def test_an_upstream_key_without_caller_auth_still_replaces_the_callers(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(with_auth(make_config(("r", r.url, 1)),
                                     AuthConfig(upstream_api_key="up-0")))
    async with client.post(p.url + COMPLETIONS, json={}, headers=bearer("caller")) as answer:
        assert answer.status == 200  # no caller key needed: auth.api_keys is not set
    assert r.seen_headers[0]["Authorization"] == "Bearer up-0"
    assert p.metric("batchgate_requests_total", replica="r", route=COMPLETIONS, code="200",
                    tenant="none") == 1


async def test_probes_and_metrics_need_no_key(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(with_auth(make_config(("r", r.url, 1)), TWO_TENANTS))
    for path in ("/healthz", "/readyz", "/metrics"):
        async with client.get(p.url + path) as answer:
            assert answer.status == 200, path


async def test_rotation_by_replace_on_a_running_proxy(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """What a reload does with auth (proxy.edge.auth.KeyRing.replace): the old key stops at
    once, the new one works, and a request let in with the old key is not cut."""
    keys = tmp_path / "keys"
    keys.write_text(f"team-a:{KEY_A}\n")
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(with_auth(make_config(("r", r.url, 2)),
                                     AuthConfig(api_keys_file=str(keys))))
    held = asyncio.create_task(client.post(p.url + COMPLETIONS, json={"hold": True},
                                           headers=bearer(KEY_A)))
    await until(lambda: r.in_flight == 1, "the old key's request is at the replica")
    rotated = KEY_A[::-1]
    keys.write_text(f"# rotated\nteam-a:{rotated}\n")
    p.app[AUTH].replace(AuthConfig(api_keys_file=str(keys)))
    async with client.post(p.url + COMPLETIONS, json={}, headers=bearer(KEY_A)) as answer:
        assert answer.status == 401
    async with client.post(p.url + COMPLETIONS, json={}, headers=bearer(rotated)) as answer:
        assert answer.status == 200
    r.gate.set()
    async with await asyncio.wait_for(held, BOUND_S) as answer:
        assert answer.status == 200
    assert p.metric("batchgate_requests_total", replica="r", route=COMPLETIONS, code="200",
                    tenant="team-a") == 2


async def test_rotation_by_reload_and_a_broken_keys_file_keeps_the_keys_in_force(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The keys file is re-read by a reload (POST /admin/reload, as SIGHUP): rotated keys work
    at once; a file that no longer reads refuses the reload and the old keys stay."""
    keys = tmp_path / "keys"
    keys.write_text(f"team-a:{KEY_A}\n")
    r: FakeReplica = await replicas("r")
    config = with_auth(make_config(("r", r.url, 2)), AuthConfig(api_keys_file=str(keys)))
    p: Proxy = await proxy(config)
    p.app[RELOADER].load = lambda: config  # the config file itself is unchanged

    async def status(key: str) -> int:
        async with client.post(p.url + COMPLETIONS, json={}, headers=bearer(key)) as answer:
            return answer.status

    async def reload() -> tuple[int, str]:
        async with client.post(p.url + "/admin/reload", headers=bearer(KEY_A)) as answer:
            return answer.status, (await answer.json())["result"]

    assert await status(KEY_A) == 200
    keys.write_text("team-a has no colon\n")
    assert await reload() == (400, "failure")
    assert await status(KEY_A) == 200  # refused: the keys in force stay
    rotated = KEY_A[::-1]
    keys.write_text(f"team-a:{rotated}\n")
    async with client.post(p.url + "/admin/reload", headers=bearer(KEY_A)) as answer:
        assert answer.status == 200  # let in by the old key, which the reload then retires
    assert (await status(KEY_A), await status(rotated)) == (401, 200)
    assert p.metric("batchgate_config_reloads_total", result="failure") == 1
    assert p.metric("batchgate_config_reloads_total", result="success") == 1


async def test_a_key_never_reaches_logs_metrics_or_errors(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    r: FakeReplica = await replicas("r")
    out = io.BytesIO()
    access = AccessLog(out, "text")
    auth = dataclasses.replace(TWO_TENANTS, upstream_api_key="sk-upstream-secret")
    config = with_auth(make_config(("r", r.url, 1), queue_timeout_s=5), auth)
    p: Proxy = await proxy(config, access)
    sent = [KEY_A, KEY_A[:-1] + "Q", "sk-guess-" + KEY_B]
    for key in sent:
        for headers in (bearer(key), {"x-api-key": key}):
            async with client.post(p.url + COMPLETIONS, json={"status": 500},
                                   headers=headers) as answer:
                await answer.read()
    async with client.get(p.url + "/metrics") as answer:
        exposition = await answer.text()
    access.close()
    everything = "\n".join([out.getvalue().decode(), exposition, caplog.text, repr(p.app[AUTH]),
                            repr(config), generate_latest(p.app[METRICS].registry).decode()])
    for secret in [*sent, KEY_B, "sk-upstream-secret"]:
        assert secret not in everything
    assert "tenant=team-a" in out.getvalue().decode()


async def test_require_key_guards_an_admin_handler(
    client: aiohttp.ClientSession
) -> None:
    """The helpers /admin/* handlers on the public port use: a decorator, or a guard."""
    app = web.Application()
    app[AUTH] = KeyRing(TWO_TENANTS)
    app[METRICS] = Metrics()

    async def admin(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def replicas(request: web.Request) -> web.StreamResponse:
        return denied(request) or web.json_response([])

    app.router.add_post("/admin/reload", require_key(admin))
    app.router.add_get("/admin/replicas", replicas)
    runner, url = await start_app(app)
    try:
        async with client.post(url + "/admin/reload") as answer:
            assert answer.status == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
            assert (await answer.json())["error"]["code"] == "invalid_api_key"
        async with client.post(url + "/admin/reload", headers=bearer(KEY_B)) as answer:
            assert answer.status == 200
        async with client.get(url + "/admin/replicas", headers=bearer(KEY_A[:-1])) as answer:
            assert answer.status == 401
        async with client.get(url + "/admin/replicas", headers={"x-api-key": KEY_A}) as answer:
            assert answer.status == 200
        app[AUTH].replace(AuthConfig())  # auth off: as it is
        async with client.post(url + "/admin/reload") as answer:
            assert answer.status == 200
    finally:
        await runner.cleanup()
    assert app[METRICS].registry.get_sample_value(
        "batchgate_rejected_requests_total", {"reason": "unauthorized"}) == 2


def test_replica_config_keeps_its_key_out_of_its_repr() -> None:
    replica = ReplicaConfig(name="r", max_concurrency=1, url="http://h:1", api_key="sk-rrr")
    assert "sk-rrr" not in repr(replica)


async def test_the_openai_sdk_raises_authentication_error_and_works_with_a_key(
    proxy: Factory,
) -> None:
    """What callers see: the SDK's own AuthenticationError for a wrong key (our 401 body is
    OpenAI's), and a normal answer, with its model logged, for a right one."""
    import openai
    from openai import AsyncOpenAI

    from proxy.config import ServerConfig, SimulatedConfig
    from proxy.server import embedded_replicas

    config = Config(
        replicas=(ReplicaConfig(name="sim-0", max_concurrency=2,
                                simulated=SimulatedConfig(max_batch=2, time_scale=0.01)),),
        server=ServerConfig(host="127.0.0.1", port=0), auth=TWO_TENANTS,
    )
    out = io.BytesIO()
    access = AccessLog(out, "json")
    async with embedded_replicas(config) as resolved:
        p: Proxy = await proxy(resolved, access)
        for key in (KEY_A[:-1], KEY_B):
            sdk = AsyncOpenAI(base_url=p.url + "/v1", api_key=key, max_retries=0)
            try:
                if key == KEY_B:
                    answer = await sdk.completions.create(model="sim-0", prompt="hi",
                                                          max_tokens=2)
                    assert answer.usage is not None and answer.usage.completion_tokens == 2
                else:
                    with pytest.raises(openai.AuthenticationError) as caught:
                        await sdk.completions.create(model="sim-0", prompt="hi", max_tokens=2)
                    assert caught.value.status_code == 401
                    assert caught.value.code == "invalid_api_key"
            finally:
                await sdk.close()
    access.close()
    refused, served = log_lines(out)
    assert refused["outcome"] == "rejected:unauthorized" and refused["tenant"] is None
    assert served["tenant"] == "team-b" and served["model"] == "sim-0"
