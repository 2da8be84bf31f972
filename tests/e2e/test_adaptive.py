"""Adaptive caps against a real llama.cpp engine: batchgate reads ``llamacpp:requests_deferred``
and ``llamacpp:requests_processing`` from its ``/metrics`` and settles at its slot count."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import pytest

from e2e.llama import LlamaServer
from tests.e2e.harness import CTX_PER_SLOT, Batchgate, batchgate_config, scrape, wait_for

pytestmark = pytest.mark.e2e
ENGINE_SLOTS = 2


@pytest.mark.timeout(150)
async def test_the_cap_settles_at_llama_servers_slots(
    llama_artifacts: tuple[Path, Path], tmp_path: Path
) -> None:
    binary, model = llama_artifacts
    with LlamaServer(n_parallel=ENGINE_SLOTS, ctx_per_slot=CTX_PER_SLOT, binary=binary,
                     model=model, log_path=tmp_path / "llama.log") as engine:
        config = batchgate_config({"llama": engine.base_url}, max_concurrency=1)
        config["replicas"][0]["adaptive"] = {"min": 1, "max": 16, "interval_s": 0.25}
        batchgate = Batchgate(config, tmp_path / "batchgate").start()
        stop = asyncio.Event()
        try:
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=60)) as session:

                async def caller() -> None:
                    body = {"prompt": "Once upon a time", "max_tokens": 48,
                            "ignore_eos": True}
                    while not stop.is_set():
                        async with session.post(batchgate.url + "/v1/completions",
                                                json=body) as response:
                            assert response.status == 200, await response.text()
                            await response.read()

                load = [asyncio.create_task(caller()) for _ in range(4 * ENGINE_SLOTS)]
                caps: list[float] = []

                async def settled() -> bool:
                    seen = await scrape(session, batchgate.url)
                    caps.append(seen.get("batchgate_replica_max_concurrency", replica="llama"))
                    await asyncio.sleep(0.25)  # about one adaptive reading between looks
                    tail = caps[-12:]
                    return len(tail) == 12 and len(set(tail)) == 1 and len(caps) > 16

                try:
                    await wait_for(settled, "the cap stays put for 12 readings", bound=90)
                finally:
                    stop.set()
                    for task in load:
                        task.cancel()
                    for task in load:
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                seen = await scrape(session, batchgate.url)
            assert caps[-1] in (ENGINE_SLOTS, ENGINE_SLOTS + 1), caps
            assert seen.get("batchgate_replica_engine_waiting", replica="llama") <= 1, caps
            assert seen.get("batchgate_adaptive_scrape_errors_total", replica="llama") == 0
        finally:
            assert batchgate.stop() == 0, batchgate.log()
        assert "Traceback" not in batchgate.log()


