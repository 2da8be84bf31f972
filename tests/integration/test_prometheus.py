"""A real Prometheus server scrapes batchgate; its HTTP API returns what the traffic implies."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import FakeReplica, Proxy, make_config, until

Factory = Callable[..., Any]
BOUND_S = 40.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async with self.session.get(self.url + "/api/v1/query", params={"query": expr}) as r:
            body = await r.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value_when(self, expr: str, accept: Callable[[float], bool]) -> float:
        """Poll the query until its single value is acceptable (bounded: a scrape is 1 s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOUND_S
        last: list[dict[str, Any]] = []
        while loop.time() < deadline:
            last = await self.query(expr)
            if len(last) == 1 and accept(float(last[0]["value"][1])):
                return float(last[0]["value"][1])
            await asyncio.sleep(0.25)
        raise AssertionError(f"{expr}: never acceptable, last result {last}")


@pytest.fixture
async def prometheus_for(tmp_path: Path) -> AsyncIterator[Callable[[str], Any]]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is missing: `make test` installs Debian's prometheus package")
    procs: list[asyncio.subprocess.Process] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(target: str) -> Prometheus:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: batchgate\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        proc = await asyncio.create_subprocess_exec(
            binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        sessions.append(session)
        prom = Prometheus(f"http://127.0.0.1:{port}", session)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOUND_S
        while True:  # ready when its API answers
            try:
                async with session.get(prom.url + "/-/ready") as r:
                    if r.status == 200:
                        return prom
            except aiohttp.ClientError:
                pass
            if loop.time() > deadline or proc.returncode is not None:
                raise AssertionError("prometheus did not become ready")
            await asyncio.sleep(0.1)

    yield start
    for session in sessions:
        await session.close()
    for proc in procs:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_prometheus_sees_queue_rate_and_ttft(
    replicas: Factory, proxy: Factory, client: aiohttp.ClientSession,
    prometheus_for: Callable[[str], Any],
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1)))
    prom: Prometheus = await prometheus_for(p.url.removeprefix("http://"))

    # Three callers wait behind one held request: Prometheus must see a queue of 3.
    held = asyncio.create_task(client.post(p.url + "/v1/completions", json={"hold": True}))
    await until(lambda: r.in_flight == 1, "slot held")
    waiting = [asyncio.create_task(client.post(p.url + "/v1/completions", json={}))
               for _ in range(3)]
    await until(lambda: p.scheduler.queue_depth == 3, "three queued")
    assert await prom.value_when("sum(batchgate_queue_depth)", lambda v: v == 3) == 3
    r.gate.set()
    for task in (held, *waiting):
        (await task).release()

    # Twenty answers whose first byte the engine delays by 300 ms.
    for _ in range(20):
        async with client.post(p.url + "/v1/chat/completions", json={"delay_ms": 300}) as resp:
            assert resp.status == 200
    total = 4 + 20
    assert await prom.value_when("sum(batchgate_requests_total)", lambda v: v == total) == total
    rate = await prom.value_when("sum(rate(batchgate_requests_total[30s]))", lambda v: v > 0)
    assert rate > 0
    assert await prom.value_when("sum(batchgate_queue_depth)", lambda v: v == 0) == 0
    ttft_p50 = await prom.value_when(
        'histogram_quantile(0.5, sum by (le) (rate(batchgate_time_to_first_byte_seconds_bucket'
        '{route="/v1/chat/completions"}[1m])))',
        lambda v: v == v,  # not NaN: the series has data
    )
    # 300 ms falls in the (0.25, 0.5] bucket; Prometheus interpolates inside it.
    assert 0.25 <= ttft_p50 <= 0.5
