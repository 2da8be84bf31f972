"""Live reload of a real ``python -m proxy serve`` process: SIGHUP re-reads its config file.

The proxy runs as a subprocess (its signal handling and logs are what is under test); the
replicas are FakeReplicas in this process that block on their gates, so which request is where
is decided by the test. Every wait is for a state, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.integration.conftest import BOUND_S, FakeReplica
from tests.integration.test_shutdown import (
    Factory,
    _cancel,
    fresh_connections,
    poll,
    queue_depth,
    serving,
)

ROOT = Path(__file__).resolve().parents[2]
ADMIN_LISTENING = re.compile(rb"batchgate admin listening on (http://127\.0\.0\.1:\d+)")


def write(path: Path, *replicas: tuple[FakeReplica, int], **sections: Any) -> Path:
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "replicas": [{"name": r.name, "url": r.url, "max_concurrency": cap}
                     for r, cap in replicas],
        "health": {"interval_s": 60},
        "logging": {"format": "text"},
        **sections,
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def scrape(probe: aiohttp.ClientSession, url: str) -> str:
    async with probe.get(url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


def sample(text: str, series: str) -> float | None:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return None if match is None else float(match.group(1))


async def test_sighup_adds_and_removes_replicas_without_dropping_work(
    tmp_path: Path, replicas: Factory
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    path = write(tmp_path / "batchgate.yaml", (a, 1))
    async with (
        serving(path) as served,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND_S * 2)) as client,
        fresh_connections() as probe,
        contextlib.AsyncExitStack() as stack,
    ):
        async def call(payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            async with client.post(served.url + "/v1/completions", json=payload) as r:
                return r.status, await r.json()

        held = asyncio.create_task(call({"hold": True}))
        stack.push_async_callback(_cancel, held)
        await poll(lambda: _true(a.in_flight == 1), "a request in flight on a")
        queued = asyncio.create_task(call({"i": 1}))
        stack.push_async_callback(_cancel, queued)

        async def is_queued() -> bool:
            return await queue_depth(probe, served.url) == 1.0

        await poll(is_queued, "a second request queued behind it")

        # a leaves the config, b joins it.
        write(path, (b, 1))
        served.proc.send_signal(signal.SIGHUP)

        # b takes the queued request at once; a still holds its own.
        status, body = await asyncio.wait_for(queued, BOUND_S)
        assert (status, body["replica"]) == (200, "b")
        assert not held.done() and a.in_flight == 1
        text = await scrape(probe, served.url)
        assert sample(text, 'batchgate_config_reloads_total{result="success"}') == 1.0
        assert sample(text, 'batchgate_config_reloads_total{result="failure"}') == 0.0
        assert sample(text, 'batchgate_replica_in_flight{replica="a"}') == 1.0  # draining

        a.gate.set()
        status, body = await asyncio.wait_for(held, BOUND_S)
        assert (status, body["replica"]) == (200, "a")

        async def a_gone() -> bool:
            return 'replica="a"' not in await scrape(probe, served.url)

        try:
            await poll(a_gone, "every series of the removed replica a to be gone")
        except AssertionError:
            print(b"".join(served.stdout).decode(), await scrape(probe, served.url))
            raise
        assert served.proc.returncode is None
        assert served.logged("config reloaded")
        assert not served.logged("Traceback"), b"".join(served.stdout).decode()
        assert (a.completed, a.aborted, b.completed) == (1, 0, 1)


async def _true(value: bool) -> bool:
    return value


def check_config_error(path: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=BOUND_S, cwd=ROOT,
    )
    assert done.returncode == 2, done
    return done.stderr.strip()


async def test_sighup_with_an_invalid_file_logs_the_startup_error_and_keeps_serving(
    tmp_path: Path, replicas: Factory
) -> None:
    a: FakeReplica = await replicas("a")
    path = write(tmp_path / "batchgate.yaml", (a, 1))
    async with (
        serving(path) as served,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND_S)) as client,
        fresh_connections() as probe,
    ):
        path.write_text(path.read_text().replace("max_concurrency: 1", "max_concurrency: -3"))
        startup_error = check_config_error(path)  # what `serve` would have said at startup
        assert startup_error.endswith("max_concurrency: must be an integer >= 1, got -3")
        served.proc.send_signal(signal.SIGHUP)

        async def failed() -> bool:
            text = await scrape(probe, served.url)
            return sample(text, 'batchgate_config_reloads_total{result="failure"}') == 1.0

        await poll(failed, "the failed reload to be counted")
        # stdout is read as it comes: the log line may trail the counter by a moment.
        line = f"config reload (SIGHUP) failed: {startup_error}"
        await poll(lambda: _true(served.logged(line)), "the failed reload's log line")
        async with client.post(served.url + "/v1/completions", json={}) as r:
            assert r.status == 200 and (await r.json())["replica"] == "a"
        assert served.proc.returncode is None


async def test_admin_listener_serves_metrics_replicas_and_reload_off_the_public_port(
    tmp_path: Path, replicas: Factory
) -> None:
    a: FakeReplica = await replicas("a")
    b: FakeReplica = await replicas("b")
    path = write(tmp_path / "batchgate.yaml", (a, 2),
                 admin={"host": "127.0.0.1", "port": 0})
    async with (
        serving(path) as served,
        fresh_connections() as probe,
    ):
        await poll(lambda: _true(served.logged("batchgate admin listening")),
                   "the admin listener to be up")
        match = next(m for line in served.stdout if (m := ADMIN_LISTENING.search(line)))
        admin = match.group(1).decode()

        # The public port: no /metrics, no /admin/* (404, never proxied); probes stay.
        for method, route in (("GET", "/metrics"), ("POST", "/admin/reload"),
                              ("GET", "/admin/replicas")):
            async with probe.request(method, served.url + route) as r:
                assert r.status == 404, route
                assert (await r.json())["error"]["code"] == "not_found"
        for route in ("/healthz", "/readyz"):
            async with probe.get(served.url + route) as r:
                assert r.status == 200
        assert a.arrivals == 0

        text = await scrape(probe, admin)
        assert sample(text, 'batchgate_replica_max_concurrency{replica="a"}') == 2.0
        assert sample(text, 'batchgate_config_reloads_total{result="success"}') == 0.0
        assert (sample(text, "batchgate_config_last_reload_success_timestamp_seconds")
                or 0.0) > 0
        assert (sample(text, "process_open_fds") or 0.0) > 0
        assert (sample(text, "process_resident_memory_bytes") or 0.0) > 0

        async with probe.get(admin + "/admin/replicas") as r:
            assert r.status == 200
            assert await r.json() == [{
                "name": "a", "url": a.url, "state": "healthy", "in_flight": 0,
                "max_concurrency": 2, "ejected_until": None, "draining": False,
                "models": None, "models_pending": False, "max_tokens_in_flight": None,
                "tokens_in_flight": 0, "adaptive": None,
            }]

        write(path, (a, 1), (b, 3), admin={"host": "127.0.0.1", "port": 0})
        async with probe.post(admin + "/admin/reload") as r:
            assert r.status == 200
            assert await r.json() == {"result": "success",
                                      "changes": "+b; a max_concurrency 2->1"}
        async with probe.get(admin + "/admin/replicas") as r:
            assert [(e["name"], e["max_concurrency"]) for e in await r.json()] == [
                ("a", 1), ("b", 3)]

        # The admin port itself cannot change live: refused, 409, nothing applied.
        write(path, (a, 1), admin={"host": "127.0.0.1", "port": 1})
        async with probe.post(admin + "/admin/reload") as r:
            assert r.status == 409
            body = await r.json()
        assert body["result"] == "failure"
        assert body["error"]["code"] == "cannot_change_live"
        assert "admin.port cannot change without a restart" in body["error"]["message"]

        path.write_text("replicas: []\n")
        async with probe.post(admin + "/admin/reload") as r:
            assert r.status == 400
            body = await r.json()
        assert body["error"]["code"] == "invalid_config"
        assert body["error"]["message"] == check_config_error(path)

        async with probe.get(admin + "/admin/reload") as r:
            assert r.status == 405 and r.headers["Allow"] == "POST"
        text = await scrape(probe, admin)
        assert sample(text, 'batchgate_config_reloads_total{result="success"}') == 1.0
        assert sample(text, 'batchgate_config_reloads_total{result="failure"}') == 2.0
        assert 'replica="b"' in text
        assert not served.logged("Traceback"), b"".join(served.stdout).decode()


async def test_sighup_starts_an_added_simulated_engine_and_stops_a_removed_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "batchgate.yaml"

    def simulated(name: str) -> dict[str, Any]:
        return {"name": name, "max_concurrency": 2, "simulated": {"time_scale": 0.01}}

    def config(*names: str) -> str:
        return yaml.safe_dump({
            "server": {"host": "127.0.0.1", "port": 0},
            "replicas": [simulated(n) for n in names],
            "logging": {"format": "text"},
        })

    path.write_text(config("s1"))
    async with (
        serving(path) as served,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND_S)) as client,
    ):
        async def replicas_now() -> list[dict[str, Any]]:
            async with client.get(served.url + "/admin/replicas") as r:
                listing: list[dict[str, Any]] = await r.json()
                return listing

        [s1] = await replicas_now()
        path.write_text(config("s2"))
        served.proc.send_signal(signal.SIGHUP)
        await poll(lambda: _true(served.logged("replica s1 is gone")), "s1 retired")
        [s2] = await replicas_now()
        assert s2["name"] == "s2" and s2["url"].startswith("http://127.0.0.1:")
        assert s2["url"] != s1["url"]
        async with client.post(served.url + "/v1/completions",
                               json={"prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200
        async def s1_stopped() -> bool:
            try:
                async with client.get(s1["url"] + "/health"):
                    return False
            except aiohttp.ClientConnectionError:
                return True

        await poll(s1_stopped, "s1's engine stopped once its replica is gone")
        assert not served.logged("Traceback"), b"".join(served.stdout).decode()


async def test_a_reloaded_drain_timeout_applies_to_the_next_sigterm(
    tmp_path: Path, replicas: Factory
) -> None:
    a: FakeReplica = await replicas("a")
    # Far longer than every bound below: only the reloaded deadline lets the process exit.
    path = write(tmp_path / "batchgate.yaml", (a, 1),
                 server={"host": "127.0.0.1", "port": 0, "drain_timeout_s": BOUND_S * 6})
    async with (
        serving(path) as served,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND_S * 2)) as client,
        fresh_connections() as probe,
        contextlib.AsyncExitStack() as stack,
    ):
        async def held_call() -> int:
            async with client.post(served.url + "/v1/completions", json={"hold": True}) as r:
                await r.read()
                return r.status

        held = asyncio.create_task(held_call())
        stack.push_async_callback(_cancel, held)
        await poll(lambda: _true(a.in_flight == 1), "a request held on a")
        write(path, (a, 1), server={"host": "127.0.0.1", "port": 0, "drain_timeout_s": 0.2})
        served.proc.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            text = await scrape(probe, served.url)
            return sample(text, 'batchgate_config_reloads_total{result="success"}') == 1.0

        await poll(reloaded, "the reload to apply")
        served.proc.send_signal(signal.SIGTERM)
        assert await served.exit_code() == 0
        assert served.logged("deadline 0.2s") and served.logged("cutting 1 requests")
        assert await asyncio.wait_for(held, BOUND_S) == 503
