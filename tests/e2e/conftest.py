"""Two real llama.cpp engines (``llama-server -np 4``) behind a real batchgate process.

Started once per session (about a second). The engine binary (~4 min to build, once per
machine) and the tiny model are made by ``make e2e`` *before* pytest starts: a build cannot
fit in a test's timeout. Without them the suite fails at once, naming the command to run.

After every test the whole stack must be idle again: no request queued or in flight in
batchgate, no slot busy and nothing deferred in either engine, every process alive.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from openai import AsyncOpenAI

from e2e.llama import LlamaServer, cache_dir, http_get
from e2e.make_tiny_model import is_valid
from tests.e2e.harness import (
    BOUND_S,
    CTX_PER_SLOT,
    METRIC_DEFERRED,
    METRIC_PROCESSING,
    REPLICAS,
    SLOTS,
    Batchgate,
    Scrape,
    Stack,
    batchgate_config,
    observe,
    wait_for,
)


@pytest.fixture(scope="session")
def llama_artifacts() -> tuple[Path, Path]:
    cache = cache_dir()
    binary, model = cache / "llama-server", cache / "tiny-llama.gguf"
    if not (binary.is_file() and os.access(binary, os.X_OK) and is_valid(model)):
        pytest.fail(
            f"no llama-server or tiny model in {cache}: run `make e2e` (it builds them once, "
            "~4 min) or `python e2e/llama.py prepare` first",
            pytrace=False,
        )
    return binary, model


@pytest.fixture(scope="session")
def stack(
    llama_artifacts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    binary, model = llama_artifacts
    logs = tmp_path_factory.mktemp("e2e")
    with contextlib.ExitStack() as processes:
        engines = tuple(
            processes.enter_context(
                LlamaServer(
                    n_parallel=SLOTS,
                    ctx_per_slot=CTX_PER_SLOT,
                    binary=binary,
                    model=model,
                    log_path=logs / f"{name}.log",
                )
            )
            for name in REPLICAS
        )
        batchgate = Batchgate(
            batchgate_config({n: e.base_url for n, e in zip(REPLICAS, engines, strict=True)}),
            logs / "batchgate",
        )
        processes.callback(batchgate.stop)  # in case the assertions below never run
        batchgate.start()
        yield Stack(engines, batchgate)
        status, body = http_get(batchgate.url + "/metrics")
        assert status == 200
        assert_nothing_failed(Scrape.parse(body.decode()))
        log = batchgate.log()
        code = batchgate.stop()
        assert code == 0, f"batchgate exited with {code} after SIGTERM:\n{log}"
        assert "Traceback" not in log, log


def assert_nothing_failed(final: Scrape) -> None:
    """Over the whole session: every answer a replica gave was a 200, batchgate rejected
    nobody, and its only upstream errors were stale pooled connections, each absorbed by a
    resend (llama-server closes the connection after every stream)."""
    answered = final.total("batchgate_requests_total")
    assert final.total("batchgate_requests_total", code="200") == answered
    assert final.total("batchgate_rejected_requests_total") == 0
    errors = final.total("batchgate_upstream_errors_total")
    assert errors == final.total("batchgate_upstream_errors_total", kind="reset")
    assert errors == final.total("batchgate_upstream_retries_total")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """For probes (``/metrics``) and raw requests."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND_S)) as session:
        yield session


@pytest.fixture
async def sdk(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    """The real ``openai`` SDK pointed at batchgate; it never retries on its own."""
    client = AsyncOpenAI(
        base_url=stack.batchgate.url + "/v1", api_key="unused", max_retries=0, timeout=BOUND_S * 2
    )
    async with client:
        yield client


@pytest.fixture
async def direct(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    """The same SDK pointed straight at the first engine: the reference answers."""
    client = AsyncOpenAI(
        base_url=stack.engines[0].base_url + "/v1", api_key="unused", max_retries=0,
        timeout=BOUND_S * 2,
    )
    async with client:
        yield client


async def stack_idle(session: aiohttp.ClientSession, stack: Stack) -> bool:
    seen = await observe(session, stack)
    return (
        seen.batchgate.total("batchgate_queue_depth") == 0
        and seen.batchgate.total("batchgate_replica_in_flight") == 0
        and all(m[METRIC_PROCESSING] == 0 and m[METRIC_DEFERRED] == 0 for m in seen.engines)
    )


@pytest.fixture(autouse=True)
async def settled(stack: Stack, http: aiohttp.ClientSession) -> AsyncIterator[None]:
    """Each test starts on an idle stack and must leave it idle: nothing leaks, nothing dies."""
    await wait_for(lambda: stack_idle(http, stack), "an idle stack before the test")
    yield
    for engine in stack.engines:
        assert engine.proc is not None and engine.proc.poll() is None, engine.log_tail()
    assert stack.batchgate.proc is not None and stack.batchgate.proc.poll() is None, (
        stack.batchgate.log()
    )
    await wait_for(
        lambda: stack_idle(http, stack),
        "batchgate and both engines idle after the test (no slot or waiter left)",
    )
    seen = await observe(http, stack)
    for replica in REPLICAS:  # no stale connection or hang-up may take a replica out
        assert seen.batchgate.get("batchgate_replica_healthy", replica=replica) == 1, replica
